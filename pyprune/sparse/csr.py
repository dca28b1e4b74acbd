"""CSR weight: W (out_features x in_features) as row pointers, sorted column indices and values."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SparseFormat, check_compressed, check_dense, check_finite, check_tensor, compressed_rows


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
            self.validate_unless_meta()

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
        """No stored entries (built without a dense tensor, so also on the meta device)."""
        crow = torch.zeros(int(shape[0]) + 1, dtype=torch.int32, device=device)
        col = torch.zeros(0, dtype=torch.int32, device=device)
        return cls(crow, col, torch.zeros(0, dtype=dtype, device=device), shape)

    def row_indices(self) -> Tensor:
        return compressed_rows(self.crow_indices, self.nnz)

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
        if col.numel() != values.numel():
            raise ValueError(
                f"col_indices ({col.numel()}) and values ({values.numel()}) must have the same length"
            )
        if not (crow.device == col.device == values.device):
            raise ValueError(
                f"crow_indices, col_indices and values must share a device, got "
                f"{crow.device}, {col.device}, {values.device}"
            )
        check_compressed(crow, col, n, k, "out_features", "in_features", "nnz")
        check_finite(values.detach())
