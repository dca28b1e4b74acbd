"""Channel importance criteria as pure functions: higher score = more important = kept.

Each function takes per-channel data with channels on dim 0. Group-level aggregation (several coupled layers
sharing one channel set) is done by the caller by concatenating the layers' per-channel rows before the call,
which makes a norm of the group the norm of the concatenated filters.
"""

from __future__ import annotations

import torch


def _rows(w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 0:
        raise ValueError("a criterion needs per-channel data with channels on dim 0, got a scalar")
    return w.detach().reshape(w.shape[0], -1).double()


def l1_norm(w: torch.Tensor) -> torch.Tensor:
    """Sum of |w| per filter (Li et al. 2017, "Pruning Filters for Efficient ConvNets"). (C, ...) -> (C,)"""
    return _rows(w).abs().sum(1)


def l2_norm(w: torch.Tensor) -> torch.Tensor:
    """Euclidean norm per filter. w: (C, ...) -> (C,)."""
    return _rows(w).pow(2).sum(1).sqrt()


def bn_scale(gamma: torch.Tensor) -> torch.Tensor:
    """|gamma| of the batch-norm scaling factors (Liu et al. 2017, Network Slimming). gamma: (C,) -> (C,)."""
    return gamma.detach().double().abs().reshape(-1)


def fpgm(w: torch.Tensor) -> torch.Tensor:
    """Filter Pruning via Geometric Median (He et al. 2019). w: (C, ...) -> (C,).

    Filters near the geometric median of the layer are the most replaceable by the others. As in the paper's
    implementation, closeness is measured by the sum of Euclidean distances to all other filters: that sum is
    the quantity the geometric median minimises, so the filters with the smallest sum are pruned first.
    """
    rows = _rows(w)
    return torch.cdist(rows, rows).sum(1)


def taylor(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance of one mini-batch (Molchanov et al. 2019).

    weight, grad: (C, ...) -> (C,).

    The loss change from removing channel c is approximated by ``(sum_s g_s w_s)^2`` over all parameters s of
    the channel; callers sum this over mini-batches.
    """
    if weight.shape != grad.shape:
        raise ValueError(f"taylor: weight {tuple(weight.shape)} and grad {tuple(grad.shape)} must match")
    return (_rows(weight) * _rows(grad)).sum(1).pow(2)


def thinet_order(contrib: torch.Tensor, n_remove: int | None = None) -> torch.Tensor:
    """Greedy channel removal order of ThiNet (Luo et al. 2017). contrib: (S, C) -> (n_remove,) int64.

    ``contrib[s, c]`` is channel c's contribution to the next layer's output at sampled location s (the output
    there is ``contrib[s].sum()``). Channels are removed one by one, each time the one whose removal adds the
    least to the squared reconstruction error ``sum_s (sum_{c in removed} contrib[s, c])^2``.
    """
    if contrib.dim() != 2:
        raise ValueError(f"thinet_order: contrib must be (samples, channels), got {tuple(contrib.shape)}")
    z = contrib.detach().double()
    c = z.shape[1]
    n_remove = c if n_remove is None else n_remove
    if isinstance(n_remove, bool) or not isinstance(n_remove, int) or not 0 <= n_remove <= c:
        raise ValueError(
            f"thinet_order: n_remove must be an int in [0, {c}] (the number of channels), got {n_remove!r}"
        )
    # ||r + z_c||^2 = ||r||^2 + 2 r.z_c + ||z_c||^2 with r the removed channels' running sum: keeping r.z for
    # every channel (updated from the Gram matrix) makes each greedy step O(C) instead of O(S*C).
    gram = z.T @ z
    r_dot_z = torch.zeros(c, dtype=z.dtype)
    diag = gram.diagonal().clone()
    available = torch.ones(c, dtype=torch.bool)
    order = []
    for _ in range(n_remove):
        err = 2 * r_dot_z + diag
        err[~available] = float("inf")
        best = int(err.argmin())
        order.append(best)
        available[best] = False
        r_dot_z += gram[:, best]
    return torch.tensor(order, dtype=torch.long)


def thinet_scores(contrib: torch.Tensor) -> torch.Tensor:
    """Scores from the full ThiNet order: the k-th channel removed scores k. contrib: (S, C) -> (C,)."""
    order = thinet_order(contrib)
    scores = torch.empty(contrib.shape[1], dtype=torch.double)
    scores[order] = torch.arange(len(order), dtype=torch.double)
    return scores


def random_scores(channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random scores, a baseline. -> (channels,)."""
    return torch.rand(channels, generator=generator, dtype=torch.double)
