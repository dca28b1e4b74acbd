"""Folding an eval-mode BatchNorm2d into the convolution before it."""

from __future__ import annotations

import torch
from torch import nn


def bn_affine(bn: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``bn(z) == scale[c] * z + shift[c]`` per channel c, from ``bn``'s running
    statistics; ``bn`` must be a BatchNorm2d over ``channels`` channels that tracks them."""
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != channels:
        raise ValueError(f"bn must be a BatchNorm2d over conv's {channels} output channels")
    if bn.running_mean is None:
        raise ValueError("bn must track running statistics to be folded")
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    return scale, beta - bn.running_mean * scale
