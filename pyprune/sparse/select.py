"""Which weights to keep for a target sparsity: magnitude (elementwise), block norm, N:M. Pure functions
returning boolean masks of the weight's shape; ties are broken by position so results are deterministic."""
from __future__ import annotations

import torch
from torch import Tensor


def _check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def _top_k_mask(scores: Tensor, keep: int) -> Tensor:
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(scores)


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Keeps the round((1 - sparsity) * numel) largest |w|."""
    sparsity = _check_sparsity(sparsity)
    keep = round((1.0 - sparsity) * weight.numel())
    return _top_k_mask(weight.detach().abs().float(), keep)


def block_mask(weight: Tensor, block: tuple[int, int], sparsity: float) -> Tensor:
    """Keeps the round((1 - sparsity) * n_blocks) (bh x bw) blocks of largest L2 norm; the edge blocks of a
    weight whose sides are not multiples of the block count only their real entries."""
    sparsity = _check_sparsity(sparsity)
    bh, bw = block
    n, k = weight.shape
    nb_r, nb_c = -(-n // bh), -(-k // bw)
    padded = torch.nn.functional.pad(weight.detach().float(), (0, nb_c * bw - k, 0, nb_r * bh - n))
    norms = padded.reshape(nb_r, bh, nb_c, bw).pow(2).sum((1, 3))
    keep_blocks = _top_k_mask(norms, round((1.0 - sparsity) * norms.numel()))
    return keep_blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keeps the n largest |w| of every m consecutive inputs (the last group of a ragged row is padded)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"N:M needs integers 0 < n <= m, got n={n!r}, m={m!r}")
    rows, k = weight.shape
    km = -(-k // m) * m
    scores = torch.nn.functional.pad(weight.detach().abs().float(), (0, km - k), value=-1.0)
    groups = scores.reshape(rows, km // m, m)
    idx = torch.topk(groups, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, km)[:, :k]
