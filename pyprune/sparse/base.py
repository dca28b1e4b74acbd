"""What every weight format shares: tensors held as module state (so state_dict, .to() and parameters()
work), a load that adopts the stored sizes (a fresh module knows the layout, not the nonzero count) and keeps
its own dtypes, and validation with messages that name the argument."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SparseFormat(nn.Module):
    """Base of CSR, BSR and Sparse24. ``values`` is an nn.Parameter (fine-tuning updates the stored nonzeros
    only); index tensors are buffers; the dense shape travels in the state_dict as extra state."""

    layout: str = ""
    _index_names: tuple[str, ...] = ()

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        if len(shape) != 2 or any(int(s) < 0 for s in shape):
            raise ValueError(f"shape must be (out_features, in_features) with sizes >= 0, got {tuple(shape)}")
        self.shape = (int(shape[0]), int(shape[1]))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """A sparse weight is not a tensor: a torch function handed one finds no implementation (TypeError).
        Owners that read ``layer.weight`` for a fused fast path check ``has_torch_function`` on it first, so
        they take their path that calls the layer (nn.TransformerEncoderLayer's linear1 / linear2)."""
        return NotImplemented

    @property
    def nnz(self) -> int:
        """Stored values (including explicit zeros inside blocks / 2:4 groups)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """Nonzeros / (out_features * in_features); nan on the meta device (no values to count)."""
        if self.values.device.type == "meta":
            return float("nan")
        numel = self.shape[0] * self.shape[1]
        return float(torch.count_nonzero(self.to_dense()).item()) / numel if numel else 0.0

    def to_dense(self) -> Tensor:
        raise NotImplementedError

    def validate(self) -> None:
        raise NotImplementedError

    def validate_unless_meta(self) -> None:
        """validate(), which reads the index values: on the meta device there are none to read."""
        if self.values.device.type != "meta":
            self.validate()

    def get_extra_state(self):
        return {"shape": self.shape}

    def set_extra_state(self, state) -> None:
        self.shape = tuple(int(s) for s in state["shape"])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The sizes are adopted, the dtypes kept (the load casts, as nn.Linear's does: a state_dict saved in
        # half precision loads into a float32 module as float32). Each stored tensor present is loaded into
        # new memory of the incoming size; ``values`` stays the same Parameter (an optimizer built before the
        # load goes on training it). A load that fails (a missing key under strict, a size error, a structure
        # that does not validate) leaves the format as it was.
        names = ("values", *self._index_names)
        old = {name: getattr(self, name) for name in names}
        old_values, old_shape = old["values"].data, self.shape
        n_errors, n_missing = len(error_msgs), len(missing_keys)
        for name in names:
            if prefix + name in state_dict:
                incoming = state_dict[prefix + name]
                if name == "values":
                    self.values.data = old_values.new_empty(incoming.shape)
                else:
                    self._buffers[name] = old[name].new_empty(incoming.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        try:
            if len(error_msgs) == n_errors and len(missing_keys) == n_missing:
                self.validate_unless_meta()
                return
        except Exception:
            self._restore(old, old_values, old_shape)
            raise
        self._restore(old, old_values, old_shape)

    def _restore(self, old: dict[str, Tensor], old_values: Tensor, old_shape: tuple[int, int]) -> None:
        self.values.data = old_values
        for name in self._index_names:
            self._buffers[name] = old[name]
        self.shape = old_shape

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}"


def check_tensor(t, name: str, *, dtype=None, dim: int | None = None, floating: bool = False) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_finite(values: Tensor, name: str = "values") -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{name} holds {bad} NaN/inf entries: a sparse weight must be finite")


def check_dense(dense: Tensor) -> None:
    check_tensor(dense, "dense", dim=2, floating=True)
    check_finite(dense, "dense")


def compressed_rows(crow_indices: Tensor, nnz: int) -> Tensor:
    """Row (block row for BSR) of every stored entry of a compressed-row structure: (nnz,) int64."""
    n_rows = crow_indices.numel() - 1
    return torch.repeat_interleave(
        torch.arange(n_rows, device=crow_indices.device),
        (crow_indices[1:] - crow_indices[:-1]).long(),
        output_size=nnz,
    )


def row_pointers(rows: Tensor, n_rows: int) -> Tensor:
    """The inverse of compressed_rows: the (n_rows + 1,) int32 row pointers of entries whose rows are ``rows``
    (counted, so in any order)."""
    counts = torch.zeros(n_rows + 1, dtype=torch.int32, device=rows.device)
    counts.index_add_(0, rows.long() + 1, torch.ones_like(rows, dtype=torch.int32))
    return torch.cumsum(counts, 0, dtype=torch.int32)


def check_compressed(
    crow: Tensor, col: Tensor, n_rows: int, n_cols: int, rows: str, cols: str, count: str
) -> None:
    """The row-pointer / column-index structure CSR and BSR share: ``n_rows + 1`` pointers from 0 to the
    entry count, non-decreasing; columns in [0, n_cols), strictly increasing within a row. ``rows``,
    ``cols`` and ``count`` describe the bounds in the messages (e.g. "out_features", "in_features", "nnz")."""
    if crow.numel() != n_rows + 1:
        raise ValueError(f"crow_indices must have {rows} + 1 = {n_rows + 1} entries, got {crow.numel()}")
    if int(crow[0]) != 0 or int(crow[-1]) != col.numel():
        raise ValueError(
            f"crow_indices must start at 0 and end at {count} = {col.numel()}, got {int(crow[0])} and {int(crow[-1])}"
        )
    if bool((crow[1:] < crow[:-1]).any()):
        raise ValueError("crow_indices must be non-decreasing (row pointers that add up to the entry count)")
    if col.numel():
        if int(col.min()) < 0 or int(col.max()) >= n_cols:
            raise ValueError(
                f"col_indices must lie in [0, {cols} = {n_cols}), got range [{int(col.min())}, {int(col.max())}]"
            )
        r = compressed_rows(crow, col.numel())
        if bool((col[1:] <= col[:-1])[r[1:] == r[:-1]].any()):
            raise ValueError(
                "col_indices must be strictly increasing within each row (sorted, no duplicates)"
            )
