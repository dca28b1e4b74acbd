"""pyprune: will pruning make *my* model faster on *my* hardware, and which kind?"""
from __future__ import annotations

from . import ops  # noqa: F401  (defines the op schemas, then loads _C)
from . import _extension, nn, sparse  # noqa: F401
from ._info import info

__version__ = "0.1.0"

__all__ = ["info", "nn", "ops", "sparse"]
