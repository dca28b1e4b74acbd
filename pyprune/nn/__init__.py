"""Drop-in modules backed by pyprune's kernels."""

from .max_pool2d import MaxPool2d
from .pruned_conv2d import PrunedConv2d
from .sparse_conv2d import SparseConv2d
from .sparse_linear import SparseLinear

__all__ = ["MaxPool2d", "PrunedConv2d", "SparseConv2d", "SparseLinear"]
