import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyprune.sparse import BSR, CSR, Sparse24
from pyprune.sparse.select import block_mask, magnitude_mask, nm_mask


def sparse_dense(n, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return w * (torch.rand(n, k, generator=g) < density)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 40),
    density=st.floats(0, 1),
    seed=st.integers(0, 10**6),
    bh=st.integers(1, 9),
    bw=st.integers(1, 9),
)
def test_round_trip_every_format(n, k, density, seed, bh, bw):
    w = sparse_dense(n, k, density, seed)
    for f in (CSR.from_dense(w), BSR.from_dense(w, (bh, bw))):
        f.validate()
        assert torch.equal(f.to_dense(), w)
    w24 = w * nm_mask(w, 2, 4)
    f = Sparse24.from_dense(w24)
    f.validate()
    assert torch.equal(f.to_dense(), w24)


def test_csr_hand_built_and_nnz():
    f = CSR(
        torch.tensor([0, 2, 2, 3], dtype=torch.int32),
        torch.tensor([0, 3, 1], dtype=torch.int32),
        torch.tensor([1.0, 2.0, 3.0]),
        (3, 4),
    )
    assert f.nnz == 3
    assert torch.equal(f.to_dense(), torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [0, 3, 0, 0]]))


@pytest.mark.parametrize(
    "crow,col,match",
    [
        ([0, 2, 2, 3], [0, 4, 1], "col_indices must lie in"),
        ([0, 2, 2, 3], [3, 0, 1], "strictly increasing"),
        ([0, 2, 2, 3], [0, 0, 1], "strictly increasing"),
        ([0, 2, 1, 3], [0, 3, 1], "non-decreasing"),
        ([0, 2, 2, 4], [0, 3, 1], "end at nnz"),
        ([0, 2, 3], [0, 3, 1], "out_features \\+ 1"),
    ],
)
def test_csr_validate_names_the_problem(crow, col, match):
    with pytest.raises(ValueError, match=match):
        CSR(
            torch.tensor(crow, dtype=torch.int32),
            torch.tensor(col, dtype=torch.int32),
            torch.tensor([1.0, 2.0, 3.0]),
            (3, 4),
        )


def test_csr_rejects_wrong_index_dtype_and_nan():
    with pytest.raises(TypeError, match="crow_indices"):
        CSR(torch.tensor([0, 1]), torch.tensor([0], dtype=torch.int32), torch.tensor([1.0]), (1, 1))
    with pytest.raises(ValueError, match="NaN"):
        CSR(
            torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([0], dtype=torch.int32),
            torch.tensor([float("nan")]),
            (1, 1),
        )
    with pytest.raises(ValueError, match="NaN"):
        CSR.from_dense(torch.tensor([[1.0, float("nan")]]))


def test_bsr_ragged_edges_must_be_zero():
    w = torch.randn(5, 7)
    f = BSR.from_dense(w, (4, 4))
    assert tuple(f.values.shape) == (4, 4, 4)
    with torch.no_grad():
        f.values[-1, 3, 3] = 1.0  # row 7 / col 7: past the 5 x 7 weight
    with pytest.raises(ValueError, match="past"):
        f.validate()


def test_bsr_bad_block():
    with pytest.raises(ValueError, match="block"):
        BSR.from_dense(torch.randn(4, 4), (0, 2))


def test_sparse24_rejects_dense_weight_and_bad_meta():
    with pytest.raises(ValueError, match="not 2:4"):
        Sparse24.from_dense(torch.ones(2, 8))
    f = Sparse24.from_dense(torch.randn(4, 8) * nm_mask(torch.randn(4, 8)))
    f.meta.zero_()  # both positions of every group = 0
    with pytest.raises(ValueError, match="distinct"):
        f.validate()


def test_masks_have_exact_counts():
    w = torch.randn(64, 96)
    assert int(magnitude_mask(w, 0.9).sum()) == round(0.1 * w.numel())
    m = block_mask(w, 0.5, (16, 32))
    assert int(m.sum()) == 64 * 96 // 2
    assert m.reshape(4, 16, 3, 32).all((1, 3)).sum() == 6
    nm = nm_mask(w, 2, 4).reshape(64, 24, 4)
    assert bool((nm.sum(-1) == 2).all())
    kept = w.abs().reshape(64, 24, 4)
    assert bool(
        (kept[nm].reshape(64, 24, 2).min(-1).values >= kept[~nm].reshape(64, 24, 2).max(-1).values).all()
    )
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(w, 1.5)


def test_state_dict_round_trip_adopts_stored_sizes():
    w = sparse_dense(30, 20, 0.3, 1)
    for src, fresh in (
        (CSR.from_dense(w), CSR.empty((30, 20))),
        (BSR.from_dense(w, (8, 4)), BSR.empty((30, 20), (8, 4))),
        (Sparse24.from_dense(w * nm_mask(w)), Sparse24.empty((30, 20))),
    ):
        fresh.load_state_dict(src.state_dict())
        assert torch.equal(fresh.to_dense(), src.to_dense())


def test_masks_of_a_weight_without_rows():
    # an empty (0, 4) mask, as magnitude_mask gives: reshape(0, -1) can't infer the columns
    w = torch.zeros(0, 4)
    for mask in (block_mask(w, 0.5, (2, 2)), nm_mask(w), magnitude_mask(w, 0.5)):
        assert mask.shape == (0, 4) and mask.dtype == torch.bool
