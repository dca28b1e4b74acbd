import importlib

import pytest
import torch

from pyprune.ops import bsr_linear
from pyprune.reference import bsr_linear_ref
from pyprune.sparse import BSR

from .linear_cases import (
    SHAPES,
    check_column_major_input,
    check_gradcheck,
    check_gradients,
    check_many_tokens,
    check_matches_reference,
    check_opcheck,
    check_shapes_and_empty,
    pruned_weight,
)

BLOCKS = [(16, 8), (32, 32), (5, 3), (1, 1), (4, 64)]


def args_for(block):
    def make_args(w, b):
        f = BSR.from_dense(w, block)
        return f.crow_indices, f.col_indices, f.values.detach(), w.shape[0], b

    return make_args


make_args = args_for((16, 8))


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_matches_reference(m, k, n, sparsity):
    check_matches_reference(bsr_linear, bsr_linear_ref, make_args, m, k, n, sparsity, "bsr")


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m", [1, 4, 7, 70])
def test_block_shapes_with_ragged_edges(block, m):
    # 50 x 70 is a multiple of none of the blocks' sides
    w = pruned_weight(50, 70, 0.6, "csr")
    x = torch.randn(m, 70)
    b = torch.randn(50)
    y = bsr_linear(x, *args_for(block)(w, b))
    torch.testing.assert_close(
        y.double(), torch.nn.functional.linear(x.double(), w.double(), b.double()), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("m", [5, 13, 70])
@pytest.mark.parametrize("bias", [True, False])
def test_very_sparse_32_row_blocks(m, bias):
    # 4 of 30 blocks stored (at most 15%: the token-rows tiles on AVX-512, x's rows read in place, 12 tokens a
    # tile): the last block row half past the 80 outputs, the last block column past the 300 inputs, block row
    # 1 empty; 2-D, 3-D and non-contiguous x
    gen = torch.Generator().manual_seed(m)
    keep = torch.zeros(3, 10, dtype=torch.bool)
    keep[0, 0] = keep[0, 9] = keep[2, 3] = keep[2, 4] = True
    mask = keep.repeat_interleave(32, 0).repeat_interleave(32, 1)[:80, :300]
    w = torch.randn(80, 300, generator=gen) * mask
    b = torch.randn(80, generator=gen) if bias else None
    args = args_for((32, 32))(w, b)
    assert args[0][-1] == 4
    xs = torch.randn(2, m, 300, generator=gen)
    for x in (xs[0], xs, xs.transpose(0, 1)):
        want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        torch.testing.assert_close(bsr_linear(x, *args).double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_tokens_pack_their_own_tiles(threads):
    check_many_tokens(bsr_linear, args_for((16, 8)), threads)


def test_shapes_and_empty():
    check_shapes_and_empty(bsr_linear, make_args, "bsr")


@pytest.mark.parametrize("block", [(16, 8), (5, 3)])
def test_gradients_match_reference(block):
    check_gradients(bsr_linear, bsr_linear_ref, args_for(block), 2, "bsr")


def test_gradcheck_float64():
    check_gradcheck(bsr_linear, args_for((2, 4)), 2, "bsr")


@pytest.mark.parametrize("m,way", [(3, "blocks"), (200, "dense")])  # density ~0.5: ~1.5 and ~100 vs 16
def test_values_gradient_both_ways_match_float64(monkeypatch, m, way):
    mod = importlib.import_module(
        "pyprune.ops.bsr_linear"
    )  # the module: pyprune.ops.bsr_linear is the function
    used = []
    for name in ("bsr_grad_values_blocks", "bsr_grad_values_dense"):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, fn=fn, name=name: used.append(name) or fn(*a))
    block = (8, 4)
    w = torch.randn(40, 36) * (torch.rand(10, 9) < 0.5).repeat_interleave(4, 0).repeat_interleave(4, 1)
    f = BSR.from_dense(w, block)
    vals = f.values.detach().clone().requires_grad_(True)
    x, g = torch.randn(m, 36), torch.randn(m, 40)
    bsr_linear(x, f.crow_indices, f.col_indices, vals, 40).backward(g)
    assert used == [f"bsr_grad_values_{way}"]
    gw = g.double().t() @ x.double()  # (40, 36); the blocks of 8 x 4 that are stored
    rows = torch.repeat_interleave(torch.arange(5), (f.crow_indices[1:] - f.crow_indices[:-1]).long())
    want = torch.stack(
        [gw[r * 8 : r * 8 + 8, c * 4 : c * 4 + 4] for r, c in zip(rows.tolist(), f.col_indices.tolist())]
    )
    torch.testing.assert_close(vals.grad.double(), want, atol=1e-4, rtol=1e-5)


def test_opcheck():
    check_opcheck(torch.ops.pyprune.bsr_linear.default, make_args, 2, "bsr")


def test_bad_input_raises_clearly():
    w = pruned_weight(16, 16, 0.5, "bsr")
    crow, col, vals, n, _ = make_args(w, None)
    with pytest.raises(ValueError, match="values"):
        bsr_linear(torch.randn(2, 16), crow, col, vals[0], n)
    with pytest.raises(ValueError, match="crow_indices"):
        bsr_linear(torch.randn(2, 16), crow, col, vals, n + 16)
    with pytest.raises(TypeError, match="values"):
        bsr_linear(torch.randn(2, 16), crow, col, vals.double(), n)


@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize(
    "crow, col, match",
    [
        ([0, 1, 2], [0, 100000000], "'col_indices' must lie in \\[0, ceil\\(in_features / bw\\) = 2\\)"),
        ([0, 1, 2], [0, -100000], "'col_indices' must lie in"),
        ([0, 3, 2], [0, 1], "'crow_indices' must be non-decreasing"),
    ],
)
def test_index_values_are_checked(m, crow, col, match):
    # out of range the kernel crashed or read garbage (blocks of 2 x 4, x with 8 features: 2 block columns)
    x = torch.randn(m, 8)
    crow, col = torch.tensor(crow, dtype=torch.int32), torch.tensor(col, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        bsr_linear(x, crow, col, torch.randn(2, 2, 4), 4)


@pytest.mark.parametrize("m", [1, 40])
def test_index_writes_through_data_are_checked(m):
    # a write through .data moves no version counter: the kept validation of these indices would let it by
    x = torch.randn(m, 8)
    crow, col = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    vals = torch.randn(2, 2, 4)
    bsr_linear(x, crow, col, vals, 4)
    col.data[1] = 10**8
    with pytest.raises(ValueError, match="'col_indices' must lie in"):
        bsr_linear(x, crow, col, vals, 4)


def test_column_major_input():
    check_column_major_input(bsr_linear, make_args, "bsr")
