"""The CUDA router: the dispatcher sends a CUDA call of a pyprune op here, and the router picks one GPU
implementation (backend) and runs it inside ``torch.profiler.record_function("pyprune::<op>/<backend>")``.

Which backend runs, first match wins:

1. ``use_backend(name)`` (process-wide; also a context manager that restores the previous choice on exit),
2. the environment variable ``PYPRUNE_BACKEND``,
3. "auto": the op's backends in order of measured speed, skipping those unavailable for the call (not
   installed, or e.g. a dtype the kernel lacks). ``reference`` (plain PyTorch, slow, always correct) is last.

A backend named explicitly but unavailable raises an error that says why and how to get it.
The choice is a module global, not a context variable, so autograd's backward threads see it too.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import reference

ENV_VAR = "PYPRUNE_BACKEND"
BACKEND_NAMES = ("triton", "cuda", "reference")
_AUTO = "auto"
_choice: str | None = None


def _check_name(name: str | None) -> str | None:
    if name is None or name == _AUTO:
        return None
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown pyprune backend {name!r}; choose one of {(_AUTO, *BACKEND_NAMES)}")
    return name


class use_backend:
    """Pick the GPU backend for pyprune ops: ``"triton"``, ``"cuda"``, ``"reference"`` or ``"auto"``/None.

    ``pyprune.use_backend("reference")`` sets it for the process; ``with pyprune.use_backend("triton"): ...``
    sets it for the block and restores the previous choice afterwards. Overrides ``PYPRUNE_BACKEND``."""

    def __init__(self, name: str | None):
        global _choice
        new = _check_name(name)
        self._previous = _choice
        _choice = new

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        global _choice
        _choice = self._previous
        return False


def get_backend() -> str | None:
    """The backend asked for (by use_backend, else PYPRUNE_BACKEND), or None for automatic choice."""
    if _choice is not None:
        return _choice
    env = os.environ.get(ENV_VAR, "").strip().lower()
    try:
        return _check_name(env or None)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}={env!r}: {e}") from None


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., Tensor]
    # returns None when the backend can run these arguments, else the reason it cannot
    unavailable: Callable[..., str | None] = lambda *args: None


def pick(op: str, backends: list[Backend], *args) -> Backend:
    wanted = get_backend()
    if wanted is not None:
        named = {b.name: b for b in backends}
        if wanted not in named:
            raise RuntimeError(
                f"pyprune::{op} has no '{wanted}' backend; it has {list(named)}. "
                f"Pick another with pyprune.use_backend(...) or {ENV_VAR}."
            )
        reason = named[wanted].unavailable(*args)
        if reason:
            raise RuntimeError(f"pyprune::{op}: backend '{wanted}' cannot run this call: {reason}")
        return named[wanted]
    reasons = []
    for b in backends:
        reason = b.unavailable(*args)
        if not reason:
            if b.name == "reference" and reasons:
                _warn_fallback(op, "; ".join(reasons))
            return b
        reasons.append(f"{b.name}: {reason}")
    raise RuntimeError(f"pyprune::{op}: no backend can run this call ({'; '.join(reasons)})")


@functools.cache
def _warn_fallback(op: str, why: str) -> None:
    warnings.warn(f"pyprune::{op} on CUDA runs the slow reference ({why})", RuntimeWarning, stacklevel=3)


def route(op: str, backends: list[Backend]) -> Callable[..., Tensor]:
    """The CUDA implementation of ``pyprune::<op>``: picks a backend per call and labels it for the profiler."""

    def impl(*args):
        backend = pick(op, backends, *args)
        with torch.profiler.record_function(f"pyprune::{op}/{backend.name}"):
            return backend.fn(*args)

    impl.__name__ = f"{op}_cuda_router"
    return impl


# ---- loading the Triton kernels ------------------------------------------------------------------------


@functools.cache
def load_triton_kernels():
    """(module pyprune_kernels, None) or (None, why not). A source checkout whose install predates kernels/
    still finds them next to the pyprune package."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return (
            None,
            f"triton is not installed ({e}); `pip install triton` (it comes with CUDA builds of torch)",
        )
    try:
        return importlib.import_module("pyprune_kernels"), None
    except ImportError as e:
        first = e
    root = Path(__file__).resolve().parents[2] / "kernels"
    if not (root / "__init__.py").is_file():
        return None, (
            f"pyprune_kernels is not importable ({first}); reinstall pyprune with "
            "`pip install --no-build-isolation -e .`"
        )
    spec = importlib.util.spec_from_file_location(
        "pyprune_kernels", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pyprune_kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001  (a broken triton install surfaces here; report it, don't crash)
        del sys.modules["pyprune_kernels"]
        return None, f"loading pyprune_kernels from {root} failed: {e!r}"
    return mod, None


# ---- bsr_linear --------------------------------------------------------------------------------------

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_bsr_args(x, crow, col, values, out_features, bias) -> None:
    op = "pyprune::bsr_linear"
    if x.dim() < 1:
        raise ValueError(
            f"{op}: argument 'x' must have at least 1 dimension (..., in_features), got a scalar"
        )
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
    if out_features < 0:
        raise ValueError(f"{op}: argument 'out_features' must be >= 0, got {out_features}")
    n_brows = -(-out_features // bh)
    if crow.numel() != n_brows + 1:
        raise ValueError(
            f"{op}: argument 'crow_indices' must have ceil(out_features / bh) + 1 = {n_brows + 1} "
            f"entries, got {crow.numel()}"
        )
    if col.numel() != nnzb:
        raise ValueError(
            f"{op}: argument 'col_indices' must have one entry per block ({nnzb}), got {col.numel()}"
        )
    tensors = [x, crow, col, values] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(
            f"{op}: x, indices, values and bias must share a device, got {[str(t.device) for t in tensors]}"
        )
    if bias is not None:
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: argument 'bias' must be {x.dtype}, got {bias.dtype}")
        if bias.dim() != 1 or bias.numel() != out_features:
            raise ValueError(
                f"{op}: argument 'bias' must have shape ({out_features},), got {tuple(bias.shape)}"
            )


def _flat(fn2d):
    """Adapts a 2-D (M, K) implementation to x of shape (..., K); checks the arguments first."""

    def run(x, crow, col, values, out_features, bias):
        _check_bsr_args(x, crow, col, values, out_features, bias)
        y = fn2d(x.reshape(-1, x.shape[-1]), crow, col, values, out_features, bias)
        return y.reshape(*x.shape[:-1], out_features)

    return run


def _bsr_triton(x2d, crow, col, values, out_features, bias):
    mod, _ = load_triton_kernels()
    return mod.bsr_linear_triton(x2d, crow, col, values, out_features, bias)


def _bsr_triton_unavailable(x, crow, col, values, out_features, bias) -> str | None:
    mod, why = load_triton_kernels()
    if mod is None:
        return why
    if x.dtype not in _TRITON_DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32, not {x.dtype}"
    return None


BSR_LINEAR_BACKENDS = [
    Backend("triton", _flat(_bsr_triton), _bsr_triton_unavailable),
    Backend("reference", _flat(reference.bsr_linear_ref)),
]

# ---- pruned_conv2d -------------------------------------------------------------------------------------


def _pruned_conv2d_reference(*args):
    from .pruned_conv2d import pruned_conv2d_checked_ref

    return pruned_conv2d_checked_ref(*args)


def _pruned_conv2d_checked(fn):
    """Runs the op's full argument checks, index values included (one device sync), before fn: a bad index
    never reaches a kernel, which would read or write out of bounds."""

    def run(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu):
        from .pruned_conv2d import check_args, check_index_values  # that module imports this one

        args = (x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu)
        check_args(*args)
        check_index_values(in_index, out_index, x.shape[1], out_channels)
        return fn(*args)

    return run


def _pruned_conv2d_triton(*args):
    mod, _ = load_triton_kernels()
    return mod.pruned_conv2d_triton(*args)


def _pruned_conv2d_triton_unavailable(x, *args) -> str | None:
    mod, why = load_triton_kernels()
    if mod is None:
        return why
    if not hasattr(mod, "pruned_conv2d_triton"):
        return (
            f"the installed pyprune_kernels ({mod.__file__}) predates pruned_conv2d; reinstall pyprune with "
            "`pip install --no-build-isolation -e .`"
        )
    if x.dtype not in _TRITON_DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32, not {x.dtype}"
    return None


_PRUNED_CONV2D_CUDA_OP = "pyprune::_pruned_conv2d_cuda"


def _pruned_conv2d_cuda(*args):
    return torch.ops.pyprune._pruned_conv2d_cuda(*args)


def _pruned_conv2d_cuda_unavailable(x, *args) -> str | None:
    from .. import _extension

    if not _extension.HAS_CUDA:
        return f"pyprune._C has no CUDA kernels: {_extension.CUDA_REASON}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(_PRUNED_CONV2D_CUDA_OP, "CUDA"):
        return (
            "pyprune._C was built with CUDA but without csrc/cuda/pruned_conv2d.cu; rebuild it with "
            "`pip install --no-build-isolation -e .`"
        )
    if x.dtype not in _TRITON_DTYPES:
        return f"the CUDA kernel takes float16, bfloat16 or float32, not {x.dtype}"
    return None


PRUNED_CONV2D_BACKENDS = [
    Backend("triton", _pruned_conv2d_checked(_pruned_conv2d_triton), _pruned_conv2d_triton_unavailable),
    Backend("cuda", _pruned_conv2d_checked(_pruned_conv2d_cuda), _pruned_conv2d_cuda_unavailable),
    Backend("reference", _pruned_conv2d_reference),
]

_TABLES = {"bsr_linear": BSR_LINEAR_BACKENDS, "pruned_conv2d": PRUNED_CONV2D_BACKENDS}


def register_cuda(op: str) -> None:
    """Registers the router as the CUDA kernel of ``pyprune::<op>`` (called at the bottom of ops/<op>.py)."""
    torch.library.impl(f"pyprune::{op}", "CUDA")(route(op, _TABLES[op]))


__all__ = [
    "BACKEND_NAMES",
    "BSR_LINEAR_BACKENDS",
    "ENV_VAR",
    "PRUNED_CONV2D_BACKENDS",
    "Backend",
    "get_backend",
    "load_triton_kernels",
    "pick",
    "register_cuda",
    "route",
    "use_backend",
]
