import pytest
import torch

from pyprune.ops import sparse24_linear
from pyprune.reference import sparse24_linear_ref
from pyprune.sparse import Sparse24

from .linear_cases import (
    SHAPES,
    check_column_major_input,
    check_gradcheck,
    check_gradients,
    check_matches_reference,
    check_opcheck,
    check_shapes_and_empty,
    pruned_weight,
)


def make_args(w, b):
    f = Sparse24.from_dense(w)
    return f.values.detach(), f.meta, w.shape[0], b


@pytest.mark.parametrize("m,k,n", SHAPES + [(9, 8, 16), (17, 36, 31)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_matches_reference(m, k, n, sparsity):
    check_matches_reference(sparse24_linear, sparse24_linear_ref, make_args, m, k, n, sparsity, "2:4")


def test_shapes_and_empty():
    check_shapes_and_empty(sparse24_linear, make_args, "2:4")


def test_gradients_match_reference():
    check_gradients(sparse24_linear, sparse24_linear_ref, make_args, 0, "2:4")


def test_gradcheck_float64():
    check_gradcheck(sparse24_linear, make_args, 0, "2:4")


def test_opcheck():
    check_opcheck(torch.ops.pyprune.sparse24_linear.default, make_args, 0, "2:4")


def test_reference_on_hand_computed_case():
    # W row 0 keeps inputs 1 and 3 of group 0 (values 2, 3) and inputs 4, 5 of group 1 (values 5, 7)
    values = torch.tensor([[2.0], [3.0], [5.0], [7.0]])
    meta = torch.tensor([[1 | (3 << 2) | (0 << 4) | (1 << 6)]], dtype=torch.uint8)
    x = torch.arange(1.0, 9.0).unsqueeze(0)  # x_k = k + 1
    expected = 2 * 2 + 3 * 4 + 5 * 5 + 7 * 6
    assert sparse24_linear_ref(x, values, meta, 1).item() == expected
    assert sparse24_linear(x, values, meta, 1).item() == expected


def test_bad_input_raises_clearly():
    w = pruned_weight(16, 16, 0.5, "2:4")
    vals, meta, n, _ = make_args(w, None)
    with pytest.raises(ValueError, match="values"):
        sparse24_linear(torch.randn(2, 24), vals, meta, n)
    with pytest.raises(TypeError, match="meta"):
        sparse24_linear(torch.randn(2, 16), vals, meta.int(), n)


@pytest.mark.parametrize("k", [48, 40, 45])  # whole vectors (the register transposes), and the padded copy
def test_column_major_input(k):
    check_column_major_input(sparse24_linear, make_args, "2:4", k=k)
