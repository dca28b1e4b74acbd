"""Pieces every linear-like op shares: the bias gradient and the reference fallback when _C is missing."""

from __future__ import annotations

import torch

from .. import reference
from .._extension import HAS_CPP


def autograd_bias_grad(ctx, grad: torch.Tensor) -> torch.Tensor | None:
    if not (ctx.has_bias and ctx.needs_input_grad[-1]):
        return None
    return grad.reshape(-1, grad.shape[-1]).sum(0)


def register_cpu_fallback(op: str) -> None:
    """Without pyprune._C the CPU key runs ``reference.<op>_ref`` (slow, correct); pyprune.info() says so."""
    if not HAS_CPP:
        torch.library.impl(f"pyprune::{op}", "CPU")(getattr(reference, f"{op}_ref"))
