"""Parameter and FLOP counts. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts
matmul/conv/attention kernels (a multiply-add is 2 FLOPs) and ignores elementwise ops, norms and pooling.
pyprune's own ops count the multiply-adds their kernels perform: one per stored weight entry (the zeros inside
BSR blocks and 2:4 groups included) and per output row or pixel; PrunedConv2d's kept weight is dense."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from . import ops as _ops  # noqa: F401  (defines the torch.ops.pyprune schemas the formulas attach to)
from .ops.pruned_conv2d import output_size


# The formulas get shapes in place of tensors, and the output's shape as out_shape.
def _linear_flops(x_shape, values_shape) -> int:
    return 2 * math.prod(values_shape) * math.prod(x_shape[:-1])


def _conv_flops(weight_shape, out_shape) -> int:
    return 2 * math.prod(weight_shape) * out_shape[0] * math.prod(out_shape[2:])


@register_flop_formula([torch.ops.pyprune.csr_linear, torch.ops.pyprune.bsr_linear])
def _compressed_linear_flop(x, crow, col, values, *args, out_shape=None, **kwargs) -> int:
    return _linear_flops(x, values)


@register_flop_formula(torch.ops.pyprune.sparse24_linear)
def _sparse24_linear_flop(x, values, *args, out_shape=None, **kwargs) -> int:
    return _linear_flops(x, values)


@register_flop_formula(torch.ops.pyprune.pruned_conv2d)
def _pruned_conv2d_flop(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, *args,
                        out_shape=None, **kwargs) -> int:  # fmt: skip
    # the conv's own output (out_shape is after the optional max pool); x and weight are shapes here
    oh, ow = output_size(x[2:], weight[2:], stride, padding, dilation)
    return _conv_flops(weight, (x[0], weight[0], oh, ow))


@register_flop_formula(torch.ops.pyprune.csr_conv2d)
def _csr_conv2d_flop(x, crow, col, values, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(values, out_shape)


@register_flop_formula(torch.ops.pyprune.sparse24_conv2d)
def _sparse24_conv2d_flop(x, values, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(values, out_shape)  # values: (K4/2, out_channels), the kept half


@register_flop_formula(torch.ops.pyprune.bsr_conv2d)
def _bsr_conv2d_flop(x, crow, col, values, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(values, out_shape)


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
