"""BSR weight: W (out_features x in_features) as a CSR of (bh x bw) blocks. The blocks of the last block row
and column reach past the weight's edge when its sides are not multiples of the block; that part is zero."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import SparseFormat, check_compressed, check_dense, check_finite, check_tensor, compressed_rows


def _blocks_grid(dense: Tensor, block: tuple[int, int]) -> Tensor:
    """(n_brows, n_bcols, bh, bw) view of ``dense`` zero-padded to whole blocks."""
    bh, bw = block
    n, k = dense.shape
    nb_r, nb_c = -(-n // bh), -(-k // bw)
    padded = torch.nn.functional.pad(dense, (0, nb_c * bw - k, 0, nb_r * bh - n))
    return padded.reshape(nb_r, bh, nb_c, bw).permute(0, 2, 1, 3)


def check_block(block) -> tuple[int, int]:
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ValueError(f"block must be a pair of positive ints (bh, bw), got {block!r}")
    return int(block[0]), int(block[1])


class BSR(SparseFormat):
    """crow_indices: (ceil(N / bh) + 1,) int32; col_indices: (nnz_blocks,) int32 block columns, strictly
    increasing within a block row; values: (nnz_blocks, bh, bw)."""

    layout = "bsr"
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
        check_tensor(values, "values", dim=3, floating=True)
        self.register_buffer("crow_indices", crow_indices)
        self.register_buffer("col_indices", col_indices)
        self.values = nn.Parameter(values.detach())
        if validate:
            self.validate_unless_meta()

    @property
    def block(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @classmethod
    def from_dense(cls, dense: Tensor, block: tuple[int, int] = (32, 32)) -> BSR:
        """Stores every block of ``dense`` that holds a nonzero."""
        check_dense(dense)
        block = check_block(block)
        grid = _blocks_grid(dense.detach(), block)
        keep = grid.ne(0).any(-1).any(-1)
        brow, bcol = torch.nonzero(keep, as_tuple=True)
        crow = torch.zeros(grid.shape[0] + 1, dtype=torch.int32, device=dense.device)
        crow[1:] = torch.cumsum(torch.bincount(brow, minlength=grid.shape[0]), 0)
        return cls(crow, bcol.to(torch.int32), grid[brow, bcol].clone(), tuple(dense.shape), validate=False)

    @classmethod
    def empty(
        cls, shape: tuple[int, int], block: tuple[int, int] = (32, 32), dtype=torch.float32, device=None
    ) -> BSR:
        """No stored blocks (built without a dense tensor, so also on the meta device)."""
        bh, bw = check_block(block)
        crow = torch.zeros(-(-int(shape[0]) // bh) + 1, dtype=torch.int32, device=device)
        col = torch.zeros(0, dtype=torch.int32, device=device)
        return cls(crow, col, torch.zeros(0, bh, bw, dtype=dtype, device=device), shape)

    def block_row_indices(self) -> Tensor:
        return compressed_rows(self.crow_indices, self.col_indices.numel())

    def to_dense(self) -> Tensor:
        bh, bw = self.block
        n, k = self.shape
        nb_r, nb_c = -(-n // bh), -(-k // bw)
        grid = torch.zeros(nb_r, nb_c, bh, bw, dtype=self.values.dtype, device=self.values.device)
        grid[self.block_row_indices(), self.col_indices.long()] = self.values.detach()
        return grid.permute(0, 2, 1, 3).reshape(nb_r * bh, nb_c * bw)[:n, :k].clone()

    def validate(self) -> None:
        n, k = self.shape
        crow, col, values = self.crow_indices, self.col_indices, self.values
        check_tensor(crow, "crow_indices", dtype=torch.int32, dim=1)
        check_tensor(col, "col_indices", dtype=torch.int32, dim=1)
        check_tensor(values, "values", dim=3, floating=True)
        bh, bw = self.block
        if bh <= 0 or bw <= 0:
            raise ValueError(f"values must hold blocks of positive size, got {tuple(values.shape)}")
        nb_r, nb_c = -(-n // bh), -(-k // bw)
        if col.numel() != values.shape[0]:
            raise ValueError(
                f"col_indices ({col.numel()}) must have one entry per block of values ({values.shape[0]})"
            )
        if not (crow.device == col.device == values.device):
            raise ValueError("crow_indices, col_indices and values must share a device")
        check_compressed(
            crow, col, nb_r, nb_c, "ceil(out_features / bh)", "ceil(in_features / bw)", "the block count"
        )
        if col.numel():
            brow = self.block_row_indices()
            v = values.detach()
            if n % bh and bool(v[brow == nb_r - 1][:, n % bh :, :].ne(0).any()):
                raise ValueError(f"values: rows past out_features = {n} in the last block row must be zero")
            if k % bw and bool(v[col == nb_c - 1][:, :, k % bw :].ne(0).any()):
                raise ValueError(
                    f"values: columns past in_features = {k} in the last block column must be zero"
                )
        check_finite(values.detach())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, block={self.block}, nnz_blocks={self.col_indices.numel()}"
