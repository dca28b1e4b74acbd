"""MaxPool2d: a drop-in nn.MaxPool2d that runs pyprune::max_pool2d (on the CPU, many times faster than ATen's
NCHW max pool)."""

from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from .pruned_conv2d import fusable_max_pool


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(kernel_size, stride, padding)`` (dilation 1, floor mode, no indices) through
    ``pyprune.ops.max_pool2d``: the same values and gradients, in the input's memory format. Input
    (N, C, H, W) or (C, H, W). ``from_dense(pool)`` converts an nn.MaxPool2d with those settings;
    ``to_dense()`` goes back."""

    def __init__(self, kernel_size, stride=None, padding=0) -> None:
        super().__init__(kernel_size, stride, padding)

    @classmethod
    def from_dense(cls, pool: nn.MaxPool2d) -> MaxPool2d:
        if not isinstance(pool, nn.MaxPool2d):
            raise TypeError(f"pool must be a torch.nn.MaxPool2d, got {type(pool).__name__}")
        if not fusable_max_pool(pool):
            raise ValueError(
                "pool must have dilation 1, ceil_mode=False and return_indices=False, got "
                f"dilation={pool.dilation}, ceil_mode={pool.ceil_mode}, return_indices={pool.return_indices}"
            )
        return cls(pool.kernel_size, pool.stride, pool.padding)

    def to_dense(self) -> nn.MaxPool2d:
        return nn.MaxPool2d(self.kernel_size, self.stride, self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return ops.max_pool2d(x.unsqueeze(0), self.kernel_size, self.stride, self.padding).squeeze(0)
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding)
