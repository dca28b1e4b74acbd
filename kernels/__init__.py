"""pyprune_kernels: Triton kernels, compiled just in time. Installed as the package ``pyprune_kernels`` (the
folder is ``kernels/`` in the checkout); pyprune's CUDA router imports the launchers from here."""

from .bsr_conv2d import bsr_conv2d_triton
from .bsr_linear import bsr_linear_grad_values_triton, bsr_linear_triton
from .csr_conv2d import csr_conv2d_triton
from .pruned_conv2d import pruned_conv2d_triton

__all__ = [
    "bsr_conv2d_triton",
    "bsr_linear_grad_values_triton",
    "bsr_linear_triton",
    "csr_conv2d_triton",
    "pruned_conv2d_triton",
]
