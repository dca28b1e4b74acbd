"""pyprune: will pruning make *my* model faster on *my* hardware, and which kind?"""
from __future__ import annotations

from . import _extension, ops, sparse, nn  # noqa: F401  (ops registers the torch.library schemas)
from ._info import info

__version__ = "0.1.0"

__all__ = ["info", "nn", "ops", "sparse"]
