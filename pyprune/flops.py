"""Parameter and FLOP counts. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts
matmul/conv/attention kernels (a multiply-add is 2 FLOPs) and ignores elementwise ops, norms and pooling."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _as_args(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def count_flops(model: nn.Module, example_inputs: torch.Tensor | tuple) -> int:
    """FLOPs of one forward pass of ``model`` (in eval mode, no grad) on ``example_inputs``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_flops(model=...) needs an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*_as_args(example_inputs))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; masked weights (parametrizations) count their full dense size."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_params(model=...) needs an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
