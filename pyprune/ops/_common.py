"""Pieces the ops share: the dispatch of a call, the bias gradient, the CSR argument checks and the reference
fallback when _C is missing."""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD

from .. import _extension, reference
from .._extension import HAS_CPP
from . import _library  # noqa: F401  (the schemas, before torch.ops.pyprune is looked up below)

# op -> its typed C++ entry in pyprune._C (csrc/module.cpp), for every public op; none without the extension,
# and none for an op that an older build of it lacks (its calls go through torch.ops)
_ENTRY_NAMES = (
    "csr_linear", "bsr_linear", "sparse24_linear", "csr_conv2d", "bsr_conv2d", "sparse24_conv2d", "pruned_conv2d",
    "max_pool2d",
)  # fmt: skip
C_ENTRIES = {
    getattr(torch.ops.pyprune, name).default: getattr(_extension._C, name)
    for name in _ENTRY_NAMES
    if HAS_CPP and hasattr(_extension._C, name)
}


def call_op(op, *args):
    """``op(*args)``. A call that needs no autograd enters the op through its pyprune._C entry: the C++
    dispatcher below the Autograd key, so dispatch keys, modes (FlopCounterMode, FakeTensorMode), CUDA's
    router and the profiler see it as they see torch.ops' call. torch.ops' Python binding spends some 3-6 us
    a call matching and boxing the arguments (A/B in one process, Xeon VM, 1 thread, tiny layers: a
    PrunedConv2d call 0.64-0.78x the time this way, SparseConv2d / SparseLinear 0.82-0.93x). Not for calls
    that need autograd, nor under torch.compile or torch.jit tracing (which trace torch.ops), a functorch
    transform, or a ``__torch_function__`` override (a TorchFunctionMode, a tensor subclass). Otherwise
    through torch.ops; with grad mode off below the Autograd key, as ATen's own ops run there: the autograd
    kernel that ``torch.library.register_autograd`` installs is Python and costs some 6 us a call even when
    it only passes the call on."""
    if fwAD._current_level >= 0:  # a forward-mode AD level is open
        _check_no_tangent(op, args)
    entry = C_ENTRIES.get(op)
    if entry is not None and _entry_ok(args):
        return entry(*args)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _check_no_tangent(op, args) -> None:
    """pyprune's ops have no forward-mode derivative: a tangent on an argument raises instead of being dropped
    (the autograd kernel of ``torch.library.register_autograd`` returned the output without one, and
    torch.func.jvp a zero tangent)."""
    functorch = torch._C._functorch
    it = functorch.peek_interpreter_stack()
    jvp = it is not None and it.key() == functorch.TransformType.Jvp
    for a in args:
        if not isinstance(a, torch.Tensor):
            continue
        if fwAD.unpack_dual(a).tangent is not None or (jvp and functorch.is_functorch_wrapped_tensor(a)):
            raise NotImplementedError(
                f"{op.name()}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not "
                "implemented; use reverse mode (backward or torch.autograd.grad)"
            )


# argument types that are never tensors: skipped before isinstance, which costs ~0.28 us on a non-tensor
# (torch.Tensor's metaclass hook); with it on each of pruned_conv2d's 14 arguments the check took 4.7 us of an
# 11.6 us call on a tiny conv, 0.9 us this way
_NOT_TENSORS = frozenset((int, float, bool, list, tuple, str, type(None)))


def _entry_ok(args) -> bool:
    if torch._C._get_tracing_state() is not None or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._has_torch_function(args):
        return False
    if not torch.is_grad_enabled():
        return True
    for a in args:
        if type(a) not in _NOT_TENSORS and isinstance(a, torch.Tensor) and a.requires_grad:
            return False
    return True


def rows2d(t: torch.Tensor) -> torch.Tensor:
    """t (..., d) as (rows, d); also for d = 0, where reshape(-1, 0) cannot infer the rows."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def eager(*tensors: torch.Tensor) -> bool:
    """True outside tracing: not under torch.compile, and every tensor a plain Tensor (not a fake or functional
    one). What backward caches and host-side choices check before they look at tensor identity or values."""
    return not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors)


def autograd_bias_grad(ctx, grad: torch.Tensor) -> torch.Tensor | None:
    if not (ctx.has_bias and ctx.needs_input_grad[-1]):
        return None
    return grad.reshape(-1, grad.shape[-1]).sum(0)


def check_csr_arrays(op: str, x, crow, col, values, n_rows: int, rows: str) -> None:
    """The CSR triple of a weight with ``n_rows`` rows (named ``rows`` in messages): values of x's dtype, int32
    1-D indices, n_rows + 1 row pointers, one column index per value. ``op`` is "pyprune::<op>"."""
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: argument 'values' must be {x.dtype} (x's dtype), got {values.dtype}")
    for name, t in (("crow_indices", crow), ("col_indices", col), ("values", values)):
        if name != "values" and t.dtype != torch.int32:
            raise TypeError(f"{op}: argument '{name}' must be torch.int32, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{op}: argument '{name}' must be 1-D, got shape {tuple(t.shape)}")
    if n_rows < 0:
        raise ValueError(f"{op}: argument '{rows}' must be >= 0, got {n_rows}")
    if crow.numel() != n_rows + 1:
        raise ValueError(
            f"{op}: argument 'crow_indices' must have {rows} + 1 = {n_rows + 1} entries, got {crow.numel()}"
        )
    if col.numel() != values.numel():
        raise ValueError(
            f"{op}: argument 'col_indices' must have as many entries as values ({values.numel()}), "
            f"got {col.numel()}"
        )


def check_bsr_arrays(op: str, x, crow, col, values, n_rows: int, rows: str) -> None:
    """The BSR triple of a weight with ``n_rows`` rows (named ``rows`` in messages): values of x's dtype
    holding (nnz_blocks, bh, bw) blocks of positive size, int32 1-D indices, ceil(n_rows / bh) + 1 row
    pointers, one column index per block. ``op`` is "pyprune::<op>"."""
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: argument 'values' must be {x.dtype} (x's dtype), got {values.dtype}")
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if t.dtype != torch.int32:
            raise TypeError(f"{op}: argument '{name}' must be torch.int32, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{op}: argument '{name}' must be 1-D, got shape {tuple(t.shape)}")
    if values.dim() != 3:
        raise ValueError(
            f"{op}: argument 'values' must be 3-D (nnz_blocks, bh, bw), got {tuple(values.shape)}"
        )
    nnzb, bh, bw = values.shape
    if bh <= 0 or bw <= 0:
        raise ValueError(
            f"{op}: argument 'values' must hold blocks of positive size, got {tuple(values.shape)}"
        )
    if n_rows < 0:
        raise ValueError(f"{op}: argument '{rows}' must be >= 0, got {n_rows}")
    n_brows = -(-n_rows // bh)
    if crow.numel() != n_brows + 1:
        raise ValueError(
            f"{op}: argument 'crow_indices' must have ceil({rows} / bh) + 1 = {n_brows + 1} "
            f"entries, got {crow.numel()}"
        )
    if col.numel() != nnzb:
        raise ValueError(
            f"{op}: argument 'col_indices' must have one entry per block ({nnzb}), got {col.numel()}"
        )


def register_cpu_fallback(op: str) -> None:
    """Without pyprune._C the CPU key runs ``reference.<op>_ref`` (slow, correct); pyprune.info() says so."""
    if not HAS_CPP:
        torch.library.impl(f"pyprune::{op}", "CPU")(getattr(reference, f"{op}_ref"))
