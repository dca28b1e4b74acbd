"""Criteria on tiny hand-computed cases."""

import math

import pytest
import torch

from pyprune.pruning import criteria


def test_l1_and_l2_filter_norms():
    w = torch.tensor([[[1.0, -2.0]], [[3.0, 4.0]], [[0.0, 0.0]]])  # 3 filters of 2 weights
    assert criteria.l1_norm(w).tolist() == [3.0, 7.0, 0.0]
    assert torch.allclose(criteria.l2_norm(w), torch.tensor([math.sqrt(5), 5.0, 0.0], dtype=torch.double))


def test_bn_scale_is_absolute_gamma():
    assert criteria.bn_scale(torch.tensor([-0.5, 0.25, 0.0])).tolist() == [0.5, 0.25, 0.0]


def test_fpgm_ranks_the_filter_at_the_geometric_median_lowest():
    # Filters at 0, 1 and 10 on a line: distance sums 11, 10, 19 -> the middle filter is most replaceable.
    w = torch.tensor([[0.0], [1.0], [10.0]])
    assert criteria.fpgm(w).tolist() == [11.0, 10.0, 19.0]
    # L1 would keep exactly the opposite of what FPGM keeps for the near-zero filter.
    assert int(criteria.fpgm(w).argmin()) == 1 and int(criteria.l1_norm(w).argmin()) == 0


def test_taylor_squares_the_summed_gradient_weight_product():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    g = torch.tensor([[0.5, 0.5], [1.0, 3.0]])
    # channel 0: (0.5 + 1.0)^2 = 2.25; channel 1: (3 - 3)^2 = 0
    assert criteria.taylor(w, g).tolist() == [2.25, 0.0]
    with pytest.raises(ValueError, match="must match"):
        criteria.taylor(w, g[:1])


def test_thinet_greedy_picks_channels_that_cancel():
    # Channels 0 and 1 cancel exactly at every sample; channel 2 is small but never cancels.
    z = torch.tensor([[1.0, -1.0, 0.3], [2.0, -2.0, 0.3], [-1.0, 1.0, 0.3]])
    order = criteria.thinet_order(z, 2)
    # Step 1: errors are 6, 6, 0.27 -> remove 2. Step 2: (0.3+z0)^2 sums to 1.69+5.29+0.49=7.47,
    # (0.3+z1)^2 -> 0.49+2.89+1.69=5.07 -> remove 1.
    assert order.tolist() == [2, 1]
    scores = criteria.thinet_scores(z)
    assert scores.tolist() == [2.0, 1.0, 0.0]
    # A smaller-norm-first rule would give the same first pick but differs once cancellation matters:
    z2 = torch.tensor([[1.0, -1.0, 0.9], [1.0, -1.0, 0.9]])
    assert criteria.thinet_order(z2, 2).tolist() == [2, 1] and criteria.thinet_order(z2).tolist() == [2, 1, 0]


def test_random_scores_are_seeded_and_shaped():
    a = criteria.random_scores(5, torch.Generator().manual_seed(3))
    b = criteria.random_scores(5, torch.Generator().manual_seed(3))
    assert a.shape == (5,) and torch.equal(a, b)


def test_criteria_reject_scalars_and_bad_shapes():
    with pytest.raises(ValueError, match="channels on dim 0"):
        criteria.l1_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match="samples, channels"):
        criteria.thinet_order(torch.ones(3))


@pytest.mark.parametrize("n_remove", [-1, 5, 2.0])
def test_thinet_order_rejects_n_remove_outside_the_channel_count(n_remove):
    with pytest.raises(ValueError, match=r"n_remove must be an int in \[0, 4\]"):
        criteria.thinet_order(torch.randn(20, 4), n_remove)
    assert criteria.thinet_order(torch.randn(20, 4), 0).tolist() == []
