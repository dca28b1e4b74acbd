"""What the Triton launchers share: whether Triton interprets (the CPU tests), the output memory format rule,
and the device guard around a launch."""

from __future__ import annotations

import contextlib
import os

import torch
import triton


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (read when called: the CPU tests load a kernel module again with it set)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def channels_last(x: torch.Tensor) -> bool:
    """The rule of F.conv2d (and pyprune.reference): channels_last unless also plainly contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def on_device(t: torch.Tensor):
    """A launch on t's CUDA device (nothing to switch for the interpreter's CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
