"""Triton pieces of bsr_linear beyond the plain forward (kernels/bsr_linear.py): the values' gradient as an
SDDMM kernel (only the stored blocks of grad^T @ x), and the balanced schedule of the forward for skewed
block rows; their router entries (pyprune/ops/_router.py) and the autograd that uses them on CUDA.

CPU (CI): kernels under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes, loaded as in test_bsr_linear_triton.py.
GPU (`-m gpu`): every dtype and block size against float64, autograd through the router, opcheck, compile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyprune.ops import _router, bsr_linear
from pyprune.ops.bsr_linear import bsr_grad_values_dense
from pyprune.sparse import BSR
from pyprune.sparse.base import compressed_rows

from .test_bsr_linear_triton import TOL32, bsr_case, ref64
from .triton_interp import interp_fixture

HAS_CUDA = torch.cuda.is_available()
interp = interp_fixture("bsr_linear")


def grad_values64(g, x, crow, col, block, n, k):
    """Spec of the values' gradient in float64: the stored blocks of the zero-padded dense grad^T @ x."""
    bh, bw = block
    nb_r, nb_c = crow.numel() - 1, -(-k // bw)
    gw = g.reshape(-1, n).double().t() @ x.reshape(-1, k).double()
    gw = F.pad(gw, (0, nb_c * bw - k, 0, nb_r * bh - n))
    grid = gw.reshape(nb_r, bh, nb_c, bw).permute(0, 2, 1, 3)
    return grid[compressed_rows(crow, col.numel()), col.long()]


def skewed_case(n_brows, k, block, dense_row, dtype=torch.float32):
    """One block row fully dense, every other block row empty but one with a single block."""
    bh, bw = block
    n = n_brows * bh
    w = torch.zeros(n, k)
    w[dense_row * bh : (dense_row + 1) * bh] = torch.randn(bh, k)
    other = (dense_row + 1) % n_brows
    w[other * bh : (other + 1) * bh, :bw] = torch.randn(bh, min(bw, k))
    w = w.to(dtype)
    f = BSR.from_dense(w, block)
    return w, f.crow_indices, f.col_indices, f.values.detach()


# ---- CPU: the SDDMM kernel under the interpreter -------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32), (5, 3)])
@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (21, 50, 40)])
def test_interpreted_grad_values_fp32_matches_float64(interp, block, m, k, n):
    # 50 and 40 are multiples of no block side (ragged edges); (5, 3) is padded to 16 x 16 tiles
    _, crow, col, _ = bsr_case(n, k, block, empty_rows=(1,))
    g, x = torch.randn(m, n), torch.randn(m, k)
    got = interp.bsr_linear_grad_values_triton(g, x, crow, col, *block)
    want = grad_values64(g, x, crow, col, block, n, k)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL32 * m**0.5 * 4)
    # entries past the weight's edges are exactly zero (the padding of values must stay zero)
    bh, bw = block
    rows = compressed_rows(crow, col.numel())[:, None] * bh + torch.arange(bh)
    cols = col.long()[:, None] * bw + torch.arange(bw)
    past = (rows >= n)[:, :, None] | (cols >= k)[:, None, :]
    assert bool((got[past] == 0).all())


@pytest.mark.triton
def test_interpreted_grad_values_fp16_at_most_twice_naive_error(interp):
    m, k, n, block = 37, 70, 45, (16, 32)
    _, crow, col, _ = bsr_case(n, k, block)
    g, x = torch.randn(m, n).half(), torch.randn(m, k).half()
    got = interp.bsr_linear_grad_values_triton(g, x, crow, col, *block)
    want = grad_values64(g, x, crow, col, block, n, k)
    naive = bsr_grad_values_dense(g.float(), x.float(), crow, col, *block).half()  # fp16-rounded sampled GEMM
    err = (got.double() - want).abs().max().item()
    naive_err = (naive.double() - want).abs().max().item()
    assert got.dtype == torch.float16
    assert err <= 2 * naive_err + 1e-6, (err, naive_err)


@pytest.mark.triton
def test_interpreted_grad_values_empty_cases(interp):
    _, crow, col, _ = bsr_case(32, 40, (16, 16))
    got = interp.bsr_linear_grad_values_triton(torch.randn(0, 32), torch.randn(0, 40), crow, col, 16, 16)
    assert got.shape == (col.numel(), 16, 16) and bool((got == 0).all())  # no tokens: zero gradient
    _, crow0, col0, _ = bsr_case(32, 40, (16, 16), sparsity=1.0)
    assert interp.bsr_linear_grad_values_triton(
        torch.randn(3, 32), torch.randn(3, 40), crow0, col0, 16, 16
    ).shape == (0, 16, 16)
    with pytest.raises(ValueError, match="same M"):
        interp.bsr_linear_grad_values_triton(torch.randn(3, 32), torch.randn(4, 40), crow, col, 16, 16)
    with pytest.raises(TypeError, match="dtype"):
        interp.bsr_linear_grad_values_triton(torch.randn(3, 32).half(), torch.randn(3, 40), crow, col, 16, 16)


def test_grad_values_reference_backend_on_cpu_tensors():
    # the private op's router, called directly with CPU tensors on its reference backend
    impl = _router.route("_bsr_linear_grad_values", _router.BSR_GRAD_VALUES_BACKENDS)
    _, crow, col, _ = bsr_case(40, 50, (16, 16))
    g, x = torch.randn(2, 3, 40), torch.randn(2, 3, 50)
    with _router.use_backend("reference"):
        got = impl(g, x, crow, col, 16, 16)
        torch.testing.assert_close(
            got.double(), grad_values64(g, x, crow, col, (16, 16), 40, 50), atol=1e-5, rtol=0
        )
        with pytest.raises(ValueError, match="leading dims"):
            impl(g, x[:1], crow, col, 16, 16)
        with pytest.raises(ValueError, match="crow_indices"):
            impl(g, x, crow, col, 8, 16)


# ---- CPU: the balanced schedule under the interpreter ----------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("split_blocks", [1, 2, None])
def test_interpreted_balanced_skewed_rows_match_float64(interp, split_blocks):
    # block row 2 holds all 6 blocks of its row, row 3 one block, rows 0, 1, 4 nothing; N ragged (70)
    w, crow, _, _ = skewed_case(5, 90, (16, 16), dense_row=2)
    assert (crow[1:] - crow[:-1]).tolist() == [0, 0, 6, 1, 0]
    n = 70
    w = w[:n]
    f = BSR.from_dense(w, (16, 16))
    crow_n, col_n, vals_n = f.crow_indices, f.col_indices, f.values.detach()
    x, b = torch.randn(11, 90), torch.randn(n)
    want = ref64(x, w, b)
    y = interp.bsr_linear_triton(
        x, crow_n, col_n, vals_n, n, b, schedule="balanced", split_blocks=split_blocks
    )
    torch.testing.assert_close(y.double(), want, rtol=0, atol=TOL32 * 90**0.5 * 4)
    torch.testing.assert_close(y[:, :32], b[:32].expand(11, 32))  # empty block rows: the bias alone
    y_rows = interp.bsr_linear_triton(x, crow_n, col_n, vals_n, n, None, schedule="rows")
    y_bal = interp.bsr_linear_triton(
        x, crow_n, col_n, vals_n, n, None, schedule="balanced", split_blocks=split_blocks
    )
    torch.testing.assert_close(y_bal, y_rows, rtol=0, atol=1e-5)


@pytest.mark.triton
def test_interpreted_balanced_plan_orders_longest_first_and_splits(interp):
    _, crow, _, _ = skewed_case(5, 90, (16, 16), dense_row=2)
    plan = interp._balanced_plan(crow, 2)
    lengths = (plan.end - plan.start).tolist()
    assert lengths == sorted(lengths, reverse=True)  # LPT order
    assert plan.n_slots == 3 and plan.n_split == 1  # the 6-block row in 3 chunks of 2; the others whole
    assert sorted(plan.row.tolist()) == [0, 1, 2, 2, 2, 3, 4]  # every block row has exactly one owner
    assert interp._balanced_plan(crow, 2) is plan  # cached while crow is unchanged
    crow.add_(0)  # an in-place change bumps the version: the plan is rebuilt
    assert interp._balanced_plan(crow, 2) is not plan


@pytest.mark.triton
def test_interpreted_auto_schedule_takes_balanced_only_for_one_wave_and_a_long_row(interp):
    # 4 block rows, row 0 holding all 4 of its blocks; on the CPU the rule counts 4 SMs
    w, crow, col, vals = skewed_case(4, 64, (16, 16), dense_row=0)
    cpu = torch.device("cpu")
    assert interp.auto_schedule(crow, 5, 1, 1, cpu) == "balanced"  # 4 programs, one wave; 4 blocks > 2 * 1
    assert interp.auto_schedule(crow, 5, 1, 2, cpu) == "rows"  # 4 blocks are not more than 2 * 2
    assert interp.auto_schedule(crow, 100, 1, 1, cpu) == "rows"  # 2 token tiles: 8 programs, two waves
    x = torch.randn(5, 64)
    y = interp.bsr_linear_triton(x, crow, col, vals, 64, None, split_blocks=1)  # the default: auto
    torch.testing.assert_close(y, interp.bsr_linear_triton(x, crow, col, vals, 64, None, schedule="balanced",
                                                           split_blocks=1), rtol=0, atol=0)  # fmt: skip
    torch.testing.assert_close(y.double(), ref64(x, w, None), rtol=0, atol=TOL32 * 64**0.5 * 4)
    # the row lengths are read once per structure; an in-place change of crow is seen
    crow.copy_(torch.tensor([0, 1, 2, 3, 4], dtype=crow.dtype))  # one block per row
    assert interp.auto_schedule(crow, 5, 1, 1, cpu) == "rows"


@pytest.mark.triton
def test_interpreted_balanced_fp16_and_bad_schedule(interp, monkeypatch):
    w, crow, col, vals = skewed_case(4, 64, (16, 32), dense_row=0, dtype=torch.float16)
    x = torch.randn(5, 64).half()
    want = ref64(x, w, None)
    y = interp.bsr_linear_triton(x, crow, col, vals, 64, None, schedule="balanced", split_blocks=1)
    naive = (F.linear(x, w).double() - want).abs().max().item()
    assert (y.double() - want).abs().max().item() <= 2 * naive + 1e-6
    monkeypatch.setenv("PYPRUNE_BSR_SCHEDULE", "balanced")  # the environment picks the schedule
    torch.testing.assert_close(interp.bsr_linear_triton(x, crow, col, vals, 64, None, split_blocks=1), y)
    with pytest.raises(ValueError, match="schedule"):
        interp.bsr_linear_triton(x, crow, col, vals, 64, None, schedule="lpt")
    with pytest.raises(ValueError, match="split_blocks"):
        interp.bsr_linear_triton(x, crow, col, vals, 64, None, schedule="balanced", split_blocks=0)


# ---- GPU -------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (16, 64), (64, 16), (8, 8), (128, 128)])
def test_gpu_grad_values_matches_float64(dtype, block):
    m, k, n = 300, 1025, 200
    _, crow, col, _ = bsr_case(n, k, block, dtype=dtype, device="cuda", empty_rows=(0,))
    g, x = torch.randn(m, n, device="cuda").to(dtype), torch.randn(m, k, device="cuda").to(dtype)
    with _router.use_backend("triton"):
        got = torch.ops.pyprune._bsr_linear_grad_values(g, x, crow, col, *block)
    want = grad_values64(g, x, crow, col, block, n, k)
    err = (got.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= TOL32 * m**0.5 * 4, err
    else:
        with _router.use_backend("reference"):
            naive = torch.ops.pyprune._bsr_linear_grad_values(g, x, crow, col, *block)
        naive_err = (naive.double() - want).abs().max().item()
        assert err <= 2 * naive_err + 1e-6, (err, naive_err)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_balanced_schedule_matches_rows(dtype):
    w, crow, col, vals = skewed_case(64, 2048, (64, 64), dense_row=5, dtype=dtype)
    crow, col, vals, w = crow.cuda(), col.cuda(), vals.cuda(), w.cuda()
    mod, why = _router.load_triton_kernels()
    assert mod is not None, why
    x = torch.randn(257, 2048, device="cuda").to(dtype)
    b = torch.randn(w.shape[0], device="cuda").to(dtype)
    want = ref64(x, w, b)
    for split in (4, None):
        y = mod.bsr_linear_triton(x, crow, col, vals, w.shape[0], b, schedule="balanced", split_blocks=split)
        err = (y.double() - want).abs().max().item()
        if dtype == torch.float32:
            assert err <= TOL32 * 2048**0.5 * 4, err
        else:
            naive = (F.linear(x, w, b).double() - want).abs().max().item()
            assert err <= 2 * naive + 1e-6, (err, naive)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_autograd_uses_sddmm_and_matches_cpu():
    _, crow, col, vals = bsr_case(96, 130, (32, 16))
    x = torch.randn(4, 9, 130, dtype=torch.float64, requires_grad=True)
    v = vals.double().requires_grad_(True)
    g = torch.randn(4, 9, 96, dtype=torch.float64)
    bsr_linear(x, crow, col, v, 96, None).backward(g)
    xd = x.detach().float().cuda().requires_grad_(True)
    vd = vals.cuda().requires_grad_(True)
    with (
        _router.use_backend("triton"),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        bsr_linear(xd, crow.cuda(), col.cuda(), vd, 96, None).backward(g.float().cuda())
    assert "pyprune::_bsr_linear_grad_values/triton" in {e.name for e in prof.events()}
    torch.testing.assert_close(vd.grad.cpu().double(), v.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xd.grad.cpu().double(), x.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_grad_values_opcheck_and_compiled_backward():
    _, crow, col, vals = bsr_case(64, 96, (32, 32), device="cuda")
    g, x = torch.randn(17, 64, device="cuda"), torch.randn(17, 96, device="cuda")
    torch.library.opcheck(torch.ops.pyprune._bsr_linear_grad_values.default, (g, x, crow, col, 32, 32))

    def loss(x, v):
        return bsr_linear(x, crow, col, v, 64, None).square().sum()

    v1 = vals.clone().requires_grad_(True)
    v2 = vals.clone().requires_grad_(True)
    loss(x, v1).backward()
    torch.compile(loss, fullgraph=True)(x, v2).backward()
    torch.testing.assert_close(v2.grad, v1.grad, atol=1e-4, rtol=1e-4)


def test_the_router_finds_every_triton_launcher():
    # the router looks launchers up on the pyprune_kernels package: the SDDMM one was missing from its
    # __init__, so on a GPU the values' gradient always fell back to the dense reference
    if _router.load_triton_kernels()[0] is None:
        pytest.skip(_router.load_triton_kernels()[1])
    for launcher in ("bsr_linear_triton", "bsr_linear_grad_values_triton", "pruned_conv2d_triton"):
        assert _router.triton_unavailable(launcher, launcher, torch.float32) is None, launcher
