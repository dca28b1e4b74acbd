"""Weight formats: CSR, BSR (any block shape, ragged edges) and 2:4, each an nn.Module holding its tensors."""

from .base import SparseFormat
from .bsr import BSR
from .csr import CSR
from .sparse24 import Sparse24

__all__ = ["SparseFormat", "CSR", "BSR", "Sparse24"]
