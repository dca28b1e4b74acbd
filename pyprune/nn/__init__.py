"""Drop-in modules backed by pyprune's kernels."""

from .sparse_linear import SparseLinear

__all__ = ["SparseLinear"]
