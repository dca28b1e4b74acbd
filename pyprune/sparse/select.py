"""Which weights to keep for a target sparsity: magnitude (elementwise), block norm, N:M. Pure functions
returning boolean keep-masks of the weight's shape; the one implementation behind SparseLinear.from_dense and
pyprune.sparsify. A weight of more than 2 dims (a conv's (O, C, kh, kw)) is viewed as (O, C*kh*kw), the
reduction dim of its im2col GEMM. Sides that are not multiples of the block or of M are handled: the edge
blocks / the last group are padded and count only their real entries. Ties prune the lower index first."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (fraction of weights zeroed), got {sparsity!r}")
    return float(sparsity)


def lowest_k(scores: Tensor, k: int) -> Tensor:
    """Keep-mask (scores' shape) that drops exactly the ``k`` lowest scores (ties: lower index dropped)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.argsort(scores.reshape(-1), stable=True)[:k]] = False
    return keep.reshape(scores.shape)


def as_2d(weight: Tensor) -> Tensor:
    """A Linear / Conv weight as (O, C*kh*kw), the reduction dim of the im2col GEMM (-1 fails with 0 rows)."""
    return weight.detach().reshape(weight.shape[0], math.prod(weight.shape[1:]))


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Zeroes exactly round(sparsity * numel) entries, those of smallest |w|."""
    sparsity = check_sparsity(sparsity)
    return lowest_k(weight.detach().abs(), round(sparsity * weight.numel()))


def block_scores(weight: Tensor, block: tuple[int, int]) -> Tensor:
    """L2 norm of every (bh, bw) tile of the 2-D view: (ceil(O / bh), ceil(I / bw))."""
    bh, bw = block
    w2 = as_2d(weight).float()
    n, k = w2.shape
    nb_r, nb_c = -(-n // bh), -(-k // bw)
    padded = torch.nn.functional.pad(w2, (0, nb_c * bw - k, 0, nb_r * bh - n))
    return padded.reshape(nb_r, bh, nb_c, bw).pow(2).sum((1, 3)).sqrt()


def expand_blocks(keep: Tensor, block: tuple[int, int], shape: torch.Size) -> Tensor:
    """Per-tile keep-mask -> per-weight keep-mask of ``shape`` (edge tiles cropped)."""
    n = shape[0]
    k = int(torch.Size(shape[1:]).numel())
    full = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[:n, :k].reshape(shape)


def block_mask(weight: Tensor, sparsity: float, block: tuple[int, int] = (32, 32)) -> Tensor:
    """Zeroes exactly round(sparsity * n_tiles) whole (bh, bw) tiles, those of smallest L2 norm."""
    sparsity = check_sparsity(sparsity)
    scores = block_scores(weight, block)
    return expand_blocks(lowest_k(scores, round(sparsity * scores.numel())), block, weight.shape)


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keeps the n largest |w| of every m consecutive inputs."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"N:M pattern needs integers 0 < N <= M, got {n!r}:{m!r}")
    w2 = as_2d(weight)
    rows, k = w2.shape
    km = -(-k // m) * m
    scores = torch.nn.functional.pad(w2.abs().float(), (0, km - k), value=-1.0)
    groups = scores.reshape(rows, km // m, m)
    top = torch.topk(groups, n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(rows, km)[:, :k].reshape(weight.shape)
