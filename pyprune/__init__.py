"""pyprune: will pruning make *my* model faster on *my* hardware, and which kind?"""

from __future__ import annotations

from . import ops  # noqa: F401  (defines the op schemas, then loads _C)
from . import _extension, nn, sparse  # noqa: F401
from ._info import info
from .ops._router import use_backend
from . import models, pruning  # noqa: F401
from .pruning import CubicSchedule, convert, count_flops, count_params, prune_channels, prune_layers, sparsify
from .pruning import to_pruned_convs

from .compare import compare
from .accuracy import pipeline

__version__ = "0.1.0"

__all__ = ["compare", "info", "pipeline", "nn", "ops", "sparse", "use_backend"]
__all__ += [
    "CubicSchedule",
    "convert",
    "count_flops",
    "count_params",
    "models",
    "prune_channels",
    "prune_layers",
    "pruning",
    "sparsify",
    "to_pruned_convs",
]
