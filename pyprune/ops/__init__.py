"""pyprune ops: one file per op (public function, fake, autograd); schemas in _library.py."""

from . import _library  # noqa: F401
from .bsr_conv2d import bsr_conv2d
from .bsr_linear import bsr_linear
from .csr_conv2d import csr_conv2d
from .csr_linear import csr_linear
from .max_pool2d import max_pool2d
from .pruned_conv2d import pruned_conv2d
from .sparse24_conv2d import sparse24_conv2d
from .sparse24_linear import sparse24_linear

__all__ = [
    "bsr_conv2d",
    "bsr_linear",
    "csr_conv2d",
    "csr_linear",
    "max_pool2d",
    "pruned_conv2d",
    "sparse24_conv2d",
    "sparse24_linear",
]
