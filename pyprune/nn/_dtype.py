"""The input dtype rule the pyprune modules share."""

from __future__ import annotations

import torch
from torch import Tensor


def weight_dtype_input(input: Tensor, dtype: torch.dtype) -> Tensor:
    """``input`` (whose dtype is not the weight's ``dtype``) in the weight's dtype under ``torch.autocast``:
    the module computes in its own dtype (the CPU kernels are fp32), as autocast runs the ops of its fp32 list,
    instead of refusing the low-precision activation an autocast layer before it produced. Outside autocast
    a mismatch is an error, as in nn.Linear."""
    if torch.is_autocast_enabled(input.device.type):
        return input.to(dtype)
    raise TypeError(
        f"input has dtype {input.dtype} but the weight is {dtype}; convert one of them "
        f"(e.g. module.to({input.dtype}))"
    )
