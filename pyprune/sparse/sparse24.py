"""2:4 weight: at most two nonzeros in every group of four consecutive inputs.

Storage (what the CPU kernel reads, see csrc/cpu/sparse24_linear.cpp): values (K4/2, N), k-major: rows 2g and
2g+1 hold the two kept weights of group g; meta (K4/8, N) uint8, 2 bits per kept value: the byte of group
pair p holds the in-group positions for value rows 4p, 4p+1, 4p+2, 4p+3 in bits 0-1, 2-3, 4-5, 6-7.
K4 = in_features rounded up to a multiple of 8; the padding is zero. The two positions of a group are
distinct and ascending.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SparseFormat, check_dense, check_finite, check_tensor


def padded_in_features(k: int) -> int:
    return -(-k // 8) * 8


def meta_positions(meta: Tensor) -> Tensor:
    """(K4/8, N) uint8 -> (K4/2, N) int64 in-group position of every stored value."""
    shifts = torch.arange(0, 8, 2, device=meta.device, dtype=torch.int32).view(1, 4, 1)
    pos = (meta.to(torch.int32).unsqueeze(1) >> shifts) & 3
    return pos.reshape(meta.shape[0] * 4, meta.shape[1]).long()


def value_columns(meta: Tensor) -> Tensor:
    """(K4/2, N) input column of every stored value."""
    pos = meta_positions(meta)
    group = torch.arange(pos.shape[0], device=meta.device).div(2, rounding_mode="floor").unsqueeze(1)
    return pos + 4 * group


def dense_matrix(values: Tensor, meta: Tensor, n_cols: int) -> Tensor:
    """The (N, n_cols) matrix that 2:4 values (K4/2, N) and meta (K4/8, N) store (differentiable in values)."""
    w = values.new_zeros(values.shape[1], padded_in_features(n_cols))
    return w.scatter_add(1, value_columns(meta).t(), values.t())[:, :n_cols]


def kept_entries(dense: Tensor, meta: Tensor) -> Tensor:
    """The (K4/2, N) entries of a dense (N, K) matrix at the positions the 2:4 meta (K4/8, N) keeps (a dense
    weight gradient sampled for the stored values)."""
    dense = torch.nn.functional.pad(dense, (0, padded_in_features(dense.shape[1]) - dense.shape[1]))
    return torch.gather(dense, 1, value_columns(meta).t()).t()


class Sparse24(SparseFormat):
    layout = "2:4"
    _index_names = ("meta",)

    def __init__(self, values: Tensor, meta: Tensor, shape: tuple[int, int], validate: bool = True):
        super().__init__(shape)
        check_tensor(values, "values", dim=2, floating=True)
        self.register_buffer("meta", meta)
        self.values = nn.Parameter(values.detach())
        if validate:
            self.validate_unless_meta()

    @classmethod
    def from_dense(cls, dense: Tensor) -> Sparse24:
        """``dense`` (N, K) must already be 2:4 sparse along K (use SparseLinear.from_dense(sparsity=0.5,
        layout="2:4") or pyprune.sparsify to prune it)."""
        check_dense(dense)
        dense = dense.detach()
        n, k = dense.shape
        k4 = padded_in_features(k)
        groups = torch.nn.functional.pad(dense, (0, k4 - k)).reshape(n, k4 // 4, 4)
        nz = groups.ne(0)
        per_group = nz.sum(-1)
        if bool((per_group > 2).any()):
            bad = int((per_group > 2).sum())
            raise ValueError(
                f"dense is not 2:4 sparse: {bad} groups of 4 inputs hold more than 2 nonzeros; "
                "prune it first (sparsity=0.5 with layout='2:4')"
            )
        # kept positions: the nonzeros first, then the lowest zero positions, then sorted ascending
        order = torch.argsort((~nz).to(torch.int8) * 4 + torch.arange(4, device=dense.device), dim=-1)
        pos = order[..., :2].sort(-1).values  # (N, G, 2)
        vals = torch.gather(groups, -1, pos)  # (N, G, 2)
        values = vals.reshape(n, k4 // 2).t().contiguous()
        p = pos.reshape(n, k4 // 8, 4).to(torch.int32)
        meta = (p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)).to(torch.uint8)
        return cls(values, meta.t().contiguous(), (n, k), validate=False)

    @classmethod
    def empty(cls, shape: tuple[int, int], dtype=torch.float32, device=None) -> Sparse24:
        """All zeros, each group keeping positions 0 and 1 (built without a dense tensor, so also on the meta
        device)."""
        n, k4 = int(shape[0]), padded_in_features(int(shape[1]))
        meta = torch.full((k4 // 8, n), 0b01000100, dtype=torch.uint8, device=device)  # positions 0, 1, 0, 1
        return cls(torch.zeros(k4 // 2, n, dtype=dtype, device=device), meta, shape)

    def to_dense(self) -> Tensor:
        return dense_matrix(self.values.detach(), self.meta, self.shape[1]).clone()

    def validate(self) -> None:
        n, k = self.shape
        k4 = padded_in_features(k)
        check_tensor(self.meta, "meta", dtype=torch.uint8, dim=2)
        check_tensor(self.values, "values", dim=2, floating=True)
        if tuple(self.values.shape) != (k4 // 2, n):
            raise ValueError(
                f"values must have shape (K4/2, N) = ({k4 // 2}, {n}) for shape {self.shape}, "
                f"got {tuple(self.values.shape)}"
            )
        if tuple(self.meta.shape) != (k4 // 8, n):
            raise ValueError(
                f"meta must have shape (K4/8, N) = ({k4 // 8}, {n}), got {tuple(self.meta.shape)}"
            )
        if self.meta.device != self.values.device:
            raise ValueError("meta and values must share a device")
        pos = meta_positions(self.meta).reshape(k4 // 4, 2, n)
        if bool((pos[:, 0] >= pos[:, 1]).any()):
            raise ValueError("meta: the two positions of every group must be distinct and ascending")
        if k4 != k:
            cols = value_columns(self.meta)
            if bool(self.values.detach()[cols >= k].ne(0).any()):
                raise ValueError(f"values: entries past in_features = {k} (padding) must be zero")
        check_finite(self.values.detach())
