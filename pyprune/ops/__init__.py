"""pyprune ops: one file per op (public function, fake, autograd); schemas in _library.py."""

from . import _library  # noqa: F401
from .csr_linear import csr_linear
from .bsr_linear import bsr_linear
from .sparse24_linear import sparse24_linear

__all__ = ["csr_linear", "bsr_linear", "sparse24_linear"]
