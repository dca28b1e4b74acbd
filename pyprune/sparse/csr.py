"""CSR weight: W (out_features x in_features) as row pointers, sorted column indices and values."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SparseFormat, check_dense, check_finite, check_tensor


class CSR(SparseFormat):
    """crow_indices: (N + 1,) int32; col_indices: (nnz,) int32, strictly increasing within a row;
    values: (nnz,) float."""

    layout = "csr"
    _index_names = ("crow_indices", "col_indices")

    def __init__(
        self,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Tensor,
        shape: tuple[int, int],
        validate: bool = True,
    ):
        super().__init__(shape)
        check_tensor(values, "values", floating=True)
        self.register_buffer("crow_indices", crow_indices)
        self.register_buffer("col_indices", col_indices)
        self.values = nn.Parameter(values.detach())
        if validate:
            self.validate()

    @classmethod
    def from_dense(cls, dense: Tensor) -> CSR:
        """Stores exactly the nonzeros of ``dense`` (out_features, in_features)."""
        check_dense(dense)
        dense = dense.detach()
        rows, cols = torch.nonzero(dense, as_tuple=True)
        if rows.numel() >= 2**31:
            raise ValueError(f"dense has {rows.numel()} nonzeros; CSR indices are int32 (< 2**31)")
        counts = torch.bincount(rows, minlength=dense.shape[0])
        crow = torch.zeros(dense.shape[0] + 1, dtype=torch.int32, device=dense.device)
        crow[1:] = torch.cumsum(counts, 0)
        return cls(crow, cols.to(torch.int32), dense[rows, cols].clone(), tuple(dense.shape), validate=False)

    @classmethod
    def empty(cls, shape: tuple[int, int], dtype=torch.float32, device=None) -> CSR:
        return cls.from_dense(torch.zeros(shape, dtype=dtype, device=device))

    def row_indices(self) -> Tensor:
        return torch.repeat_interleave(
            torch.arange(self.shape[0], device=self.crow_indices.device),
            (self.crow_indices[1:] - self.crow_indices[:-1]).long(),
            output_size=self.nnz,
        )

    def to_dense(self) -> Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[self.row_indices(), self.col_indices.long()] = self.values.detach()
        return dense

    def validate(self) -> None:
        n, k = self.shape
        crow, col, values = self.crow_indices, self.col_indices, self.values
        check_tensor(crow, "crow_indices", dtype=torch.int32, dim=1)
        check_tensor(col, "col_indices", dtype=torch.int32, dim=1)
        check_tensor(values, "values", dim=1, floating=True)
        if crow.numel() != n + 1:
            raise ValueError(f"crow_indices must have out_features + 1 = {n + 1} entries, got {crow.numel()}")
        if col.numel() != values.numel():
            raise ValueError(
                f"col_indices ({col.numel()}) and values ({values.numel()}) must have the same length"
            )
        if not (crow.device == col.device == values.device):
            raise ValueError(
                f"crow_indices, col_indices and values must share a device, got "
                f"{crow.device}, {col.device}, {values.device}"
            )
        if int(crow[0]) != 0 or int(crow[-1]) != col.numel():
            raise ValueError(
                f"crow_indices must start at 0 and end at nnz = {col.numel()}, got "
                f"{int(crow[0])} and {int(crow[-1])}"
            )
        if bool((crow[1:] < crow[:-1]).any()):
            raise ValueError("crow_indices must be non-decreasing (row pointers that add up to nnz)")
        if col.numel():
            if int(col.min()) < 0 or int(col.max()) >= k:
                raise ValueError(
                    f"col_indices must lie in [0, in_features = {k}), got range "
                    f"[{int(col.min())}, {int(col.max())}]"
                )
            rows = self.row_indices()
            same_row = rows[1:] == rows[:-1]
            if bool((col[1:] <= col[:-1])[same_row].any()):
                raise ValueError(
                    "col_indices must be strictly increasing within each row (sorted, no duplicates)"
                )
        check_finite(values.detach())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}"
