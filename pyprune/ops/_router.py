"""The CUDA router: the dispatcher sends a CUDA call of a pyprune op here, and the router picks one GPU
implementation (backend) and runs it inside ``torch.profiler.record_function("pyprune::<op>/<backend>")``.

Which backend runs, first match wins:

1. ``use_backend(name)`` (process-wide; also a context manager that restores the previous choice on exit),
2. the environment variable ``PYPRUNE_BACKEND``,
3. "auto": the op's backends in order of measured speed, skipping those unavailable for the call (not
   installed, or e.g. a dtype the kernel lacks). ``reference`` (plain PyTorch, slow, always correct) is last.

A backend named explicitly but unavailable raises an error that says why and how to get it; an op that has no
backend of that name at all (e.g. ``use_backend("cuda")`` for the BSR values' gradient or ``csr_conv2d``, which
have no CUDA kernel) takes its automatic order instead and warns once.
The choice is a module global, not a context variable, so autograd's backward threads see it too.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import reference
from ._common import check_bsr_arrays, check_csr_arrays, rows2d

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
    """Pick the GPU backend for pyprune ops: ``"triton"``, ``"cuda"``, ``"reference"``, ``"auto"`` (the
    automatic order) or None (no choice: ``PYPRUNE_BACKEND`` if set, else automatic).

    ``pyprune.use_backend("reference")`` sets it for the process; ``with pyprune.use_backend("triton"): ...``
    sets it for the block and restores the previous choice afterwards. Any name overrides ``PYPRUNE_BACKEND``,
    "auto" included."""

    def __init__(self, name: str | None):
        global _choice
        new = _AUTO if name == _AUTO else _check_name(name)
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
        return None if _choice == _AUTO else _choice
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
        if wanted in named:
            reason = named[wanted].unavailable(*args)
            if reason:
                raise RuntimeError(f"pyprune::{op}: backend '{wanted}' cannot run this call: {reason}")
            return named[wanted]
        # an op without such a backend at all (e.g. a gradient helper, or an op with only the reference on
        # CUDA) runs its automatic order, so that naming a backend does not break the ops that lack it
        _warn_missing(op, wanted, tuple(named))
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
def _warn_missing(op: str, wanted: str, have: tuple[str, ...]) -> None:
    warnings.warn(
        f"pyprune::{op} has no '{wanted}' backend (it has {list(have)}); it uses its automatic choice",
        RuntimeWarning,
        stacklevel=3,
    )


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


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_unavailable(launcher: str, what: str, dtype: torch.dtype) -> str | None:
    """Why the Triton launcher ``pyprune_kernels.<launcher>`` (``what``, for the message) cannot run a call
    in ``dtype``, or None when it can."""
    mod, why = load_triton_kernels()
    if mod is None:
        return why
    if not hasattr(mod, launcher):
        return (
            f"the installed pyprune_kernels ({mod.__file__}) predates {what}; reinstall pyprune with "
            "`pip install --no-build-isolation -e .`"
        )
    if dtype not in _TRITON_DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32, not {dtype}"
    return None


def _check_device_and_bias(op, x, crow, col, values, bias, out_features) -> None:
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


# ---- bsr_linear --------------------------------------------------------------------------------------


def _check_bsr_args(x, crow, col, values, out_features, bias) -> None:
    op = "pyprune::bsr_linear"
    if x.dim() < 1:
        raise ValueError(
            f"{op}: argument 'x' must have at least 1 dimension (..., in_features), got a scalar"
        )
    check_bsr_arrays(op, x, crow, col, values, out_features, "out_features")
    _check_device_and_bias(op, x, crow, col, values, bias, out_features)


def _flat(fn2d):
    """Adapts a 2-D (M, K) implementation to x of shape (..., K); checks the arguments first, the index values
    included (once per structure)."""

    def run(x, crow, col, values, out_features, bias):
        _check_bsr_args(x, crow, col, values, out_features, bias)
        _checked(_BSR_CHECKED, check_bsr_index_values, crow, col, -(-x.shape[-1] // values.shape[2]))
        y = fn2d(rows2d(x), crow, col, values, out_features, bias)
        return y.reshape(*x.shape[:-1], out_features)

    return run


def _bsr_triton(x2d, crow, col, values, out_features, bias):
    mod, _ = load_triton_kernels()
    return mod.bsr_linear_triton(x2d, crow, col, values, out_features, bias)


def _bsr_triton_unavailable(x, crow, col, values, out_features, bias) -> str | None:
    return triton_unavailable("bsr_linear_triton", "bsr_linear", x.dtype)


_BSR_LINEAR_CUDA_OP = "pyprune::_bsr_linear_cuda"
# the CUDA kernel multiplies on tensor cores in 16-bit only; float32 (exact, or TF32 when allowed) is Triton's
_BSR_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_BSR_CUDA_SIDES = (16, 32, 64)


def check_bsr_index_values(crow: Tensor, col: Tensor, n_bcols: int) -> None:
    """crow starts at 0, never decreases and ends at nnz_blocks; every block column is in [0, n_bcols). One
    device sync; raises ValueError naming the first problem."""
    check_csr_index_values(crow, col, n_bcols, op="pyprune::bsr_linear", bound="ceil(in_features / bw)")


def _bsr_cuda(x, crow, col, values, out_features, bias):
    _check_bsr_args(x, crow, col, values, out_features, bias)
    _checked(_BSR_CHECKED, check_bsr_index_values, crow, col, -(-x.shape[-1] // values.shape[2]))
    return torch.ops.pyprune._bsr_linear_cuda(x, crow, col, values, out_features, bias)


def _bsr_cuda_unavailable(x, crow, col, values, out_features, bias) -> str | None:
    note = (
        " (it multiplies on tensor cores in 16-bit; float32 runs on the triton or reference backend)"
        if x.dtype == torch.float32
        else ""
    )
    reason = _cuda_kernel_unavailable(_BSR_LINEAR_CUDA_OP, "bsr_linear.cu", x, _BSR_CUDA_DTYPES, note)
    if reason:
        return reason
    if values.dim() == 3 and not (values.shape[1] in _BSR_CUDA_SIDES and values.shape[2] in _BSR_CUDA_SIDES):
        return (
            f"the CUDA kernel takes blocks with sides 16, 32 or 64, not {values.shape[1]} x {values.shape[2]}; "
            "the triton backend takes any block"
        )
    if x.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(x.device)
        if major < 8:
            return (
                "the CUDA kernel needs compute capability >= 8.0 (cp.async, bf16 tensor cores); "
                f"{torch.cuda.get_device_name(x.device)} is {major}.{minor}"
            )
    return None


# "auto" tries triton before cuda: no GPU measurement says yet which is faster (benchmarks/gpu times both)
BSR_LINEAR_BACKENDS = [
    Backend("triton", _flat(_bsr_triton), _bsr_triton_unavailable),
    Backend("cuda", _bsr_cuda, _bsr_cuda_unavailable),
    Backend("reference", _flat(reference.bsr_linear_ref)),
]


# ---- bsr_linear's values gradient (private op _bsr_linear_grad_values) -----------------------------------


def _check_grad_values_args(grad, x, crow, col, bh, bw) -> None:
    op = "pyprune::_bsr_linear_grad_values"
    if grad.dtype != x.dtype:
        raise TypeError(f"{op}: grad ({grad.dtype}) must have x's dtype ({x.dtype})")
    if grad.dim() < 1 or grad.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"{op}: grad (..., N) and x (..., K) must share leading dims, got {tuple(grad.shape)} and "
            f"{tuple(x.shape)}"
        )
    if bh <= 0 or bw <= 0:
        raise ValueError(f"{op}: block sides must be positive, got ({bh}, {bw})")
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"{op}: argument '{name}' must be a 1-D torch.int32 tensor")
    if crow.numel() != -(-grad.shape[-1] // bh) + 1:
        raise ValueError(
            f"{op}: argument 'crow_indices' must have ceil(N / bh) + 1 = {-(-grad.shape[-1] // bh) + 1} entries"
        )


def _grad_values_triton(grad, x, crow, col, bh, bw):
    _check_grad_values_args(grad, x, crow, col, bh, bw)
    mod, _ = load_triton_kernels()
    return mod.bsr_linear_grad_values_triton(
        rows2d(grad), rows2d(x), crow, col, bh, bw
    )


def _grad_values_triton_unavailable(grad, x, *args) -> str | None:
    return triton_unavailable("bsr_linear_grad_values_triton", "the SDDMM kernel", x.dtype)


def _grad_values_reference(grad, x, crow, col, bh, bw):
    from .bsr_linear import bsr_grad_values_dense  # that module imports this one

    _check_grad_values_args(grad, x, crow, col, bh, bw)
    return bsr_grad_values_dense(grad, x, crow, col, bh, bw)


BSR_GRAD_VALUES_BACKENDS = [
    Backend("triton", _grad_values_triton, _grad_values_triton_unavailable),
    Backend("reference", _grad_values_reference),
]


# ---- caches keyed on a tensor's identity and version --------------------------------------------------------


class TensorCache:
    """Values derived from tensors (a converted weight, a validated index), reused while every key tensor is
    the same object at the same version (``Tensor._version`` counts in-place changes, optimizer steps
    included, under torch.inference_mode too), data pointer, dtype and device (``module.half()`` / ``.to()``
    swap a parameter's data and keep its version). Held through weak references: a freed tensor whose id is
    reused never hits. Inference tensors keep no version, so what derives from them is made again on every
    call.
    At most ``max_entries`` values, and with ``max_bytes`` at most that many bytes of tensors among them (a
    value is a tensor or a tuple of tensors and other things); the least recently used go first."""

    def __init__(self, max_entries: int = 64, max_bytes: int | None = None):
        self._entries: dict[tuple[int, ...], tuple] = {}
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        # several threads may call an op at once (autograd's backward threads, a user's own): the entries and
        # the byte count change only under the lock; make() runs outside it
        self._lock = threading.Lock()

    def get(self, tensors: tuple[Tensor, ...], make: Callable[[], object]):
        if any(t.is_inference() for t in tensors):
            return make()
        key = tuple(id(t) for t in tensors)
        versions = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        with self._lock:
            hit = self._entries.pop(key, None)
            if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], tensors)):
                self._entries[key] = hit  # most recently used last
                return hit[2]
            if hit is not None:
                self._bytes -= hit[3]
        value = make()
        size = _nbytes(value)
        with self._lock:
            old = self._entries.pop(key, None)  # another thread's, made meanwhile
            if old is not None:
                self._bytes -= old[3]
            self._entries[key] = (tuple(weakref.ref(t) for t in tensors), versions, value, size)
            self._bytes += size
            while len(self._entries) > self._max or (
                self._max_bytes is not None and self._bytes > self._max_bytes and len(self._entries) > 1
            ):
                self._bytes -= self._entries.pop(next(iter(self._entries)))[3]
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _nbytes(value) -> int:
    """The bytes of the tensors in ``value``, a tensor or tuples and lists of them (at any depth)."""
    if isinstance(value, Tensor):
        return value.nbytes
    return sum(_nbytes(v) for v in value) if isinstance(value, (tuple, list)) else 0


# ---- csr_linear ----------------------------------------------------------------------------------------

_CSR_LINEAR_CUDA_OP = "pyprune::_csr_linear_cuda"
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (crow, col) -> the column bound their values were checked against: a bad index would make the kernel read out
# of bounds, and checking the values costs a device sync, so each structure is checked once (bsr: block columns)
_CSR_CHECKED = TensorCache()
_BSR_CHECKED = TensorCache()


def _check_csr_args(x, crow, col, values, out_features, bias) -> None:
    op = "pyprune::csr_linear"
    if x.dim() < 1:
        raise ValueError(
            f"{op}: argument 'x' must have at least 1 dimension (..., in_features), got a scalar"
        )
    check_csr_arrays(op, x, crow, col, values, out_features, "out_features")
    _check_device_and_bias(op, x, crow, col, values, bias, out_features)


def check_csr_index_values(
    crow: Tensor, col: Tensor, in_features: int, op: str = "pyprune::csr_linear", bound: str = "in_features"
) -> None:
    """crow starts at 0, never decreases and ends at nnz; every column is in [0, in_features). One device sync;
    raises ValueError naming the first problem (``op`` and ``bound`` name the op and the column bound)."""
    nnz = col.numel()
    c = crow.long()
    if crow.numel() == 0 or int(c[0]) != 0 or int(c[-1]) != nnz:
        raise ValueError(f"{op}: argument 'crow_indices' must start at 0 and end at nnz = {nnz}")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{op}: argument 'crow_indices' must be non-decreasing")
    if nnz and bool(((col < 0) | (col >= in_features)).any()):
        raise ValueError(f"{op}: argument 'col_indices' must lie in [0, {bound} = {in_features})")


def _checked(cache: TensorCache, check: Callable, crow: Tensor, col: Tensor, bound: int) -> None:
    """check(crow, col, bound) once per structure (a device sync on GPU): the kernels read x at these
    indices."""
    checked_for = cache.get((crow, col), lambda: check(crow, col, bound) or bound)
    if checked_for != bound:  # the same structure against another in_features: column bounds differ
        check(crow, col, bound)


def _csr_cuda(x, crow, col, values, out_features, bias):
    _check_csr_args(x, crow, col, values, out_features, bias)
    _checked(_CSR_CHECKED, check_csr_index_values, crow, col, x.shape[-1])
    return torch.ops.pyprune._csr_linear_cuda(x, crow, col, values, out_features, bias)


def _cuda_kernel_unavailable(
    op: str, source: str, x, dtypes: tuple[torch.dtype, ...] = _CUDA_DTYPES, dtype_note: str = ""
) -> str | None:
    """Why the compiled CUDA kernel ``op`` (built from csrc/cuda/<source>) cannot run x, or None. ``dtypes``: those
    the kernel takes; ``dtype_note`` is appended to the message when x has another."""
    from .. import _extension

    if not _extension.HAS_CUDA:
        return f"pyprune._C has no CUDA kernels: {_extension.CUDA_REASON}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
        return (
            f"pyprune._C was built with CUDA but without csrc/cuda/{source}; rebuild it with "
            "`pip install --no-build-isolation -e .`"
        )
    if x.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        return f"the CUDA kernel takes {listed}, not {x.dtype}{dtype_note}"
    return None


def _csr_cuda_unavailable(x, *args) -> str | None:
    return _cuda_kernel_unavailable(_CSR_LINEAR_CUDA_OP, "csr_linear.cu", x)


def _csr_reference(x, crow, col, values, out_features, bias):
    _check_csr_args(x, crow, col, values, out_features, bias)
    _checked(_CSR_CHECKED, check_csr_index_values, crow, col, x.shape[-1])
    return reference.csr_linear_ref(x, crow, col, values, out_features, bias)


CSR_LINEAR_BACKENDS = [
    Backend("cuda", _csr_cuda, _csr_cuda_unavailable),
    Backend("reference", _csr_reference),
]


# ---- sparse24_linear -----------------------------------------------------------------------------------

_SEMI_DTYPES = (torch.float16, torch.bfloat16)
# torch's semi-structured layouts want both weight sides multiples of 64 (CUTLASS fp16/bf16: 32 x 64;
# cuSPARSELt: 16 x 16): the weight is zero-padded to 64 x 64 multiples once, x along K per call when needed
_SEMI_PAD = 64
# (values, meta) -> (semi-structured padded weight, padded K): converted once per weight version
_SEMI_CACHE = TensorCache()


def _semi_structured_kind() -> tuple[str | None, str]:
    """("cusparselt" | "cutlass", "") where torch has a semi-structured backend, else (None, why)."""
    try:
        from torch.sparse import SparseSemiStructuredTensor  # noqa: F401
    except ImportError as e:
        return None, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured ({e})"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return "cusparselt", ""
    if torch.version.cuda:
        return "cutlass", ""
    return None, f"torch {torch.__version__} is not a CUDA build (semi-structured sparsity needs CUDA)"


def sparse24_semi_unavailable(x, values, meta, out_features, bias) -> str | None:
    """Why torch's semi-structured sparsity cannot run this call, or None. Checked per call: dtype, device
    and compute capability (sparse tensor cores exist from sm_80)."""
    if x.dtype not in _SEMI_DTYPES:
        return (
            f"torch semi-structured sparsity (cuSPARSELt / CUTLASS) takes float16 or bfloat16 here, not "
            f"{x.dtype}; cast the layer with .half() / .bfloat16()"
        )
    if x.device.type != "cuda":
        return f"torch semi-structured sparsity needs CUDA tensors, got {x.device}"
    major, minor = torch.cuda.get_device_capability(x.device)
    if major < 8:
        return (
            f"torch semi-structured sparsity needs sparse tensor cores (compute capability >= 8.0); "
            f"{torch.cuda.get_device_name(x.device)} is {major}.{minor}"
        )
    kind, why = _semi_structured_kind()
    if kind is None:
        return why
    return None


def _sparse24_to_padded_dense(values: Tensor, meta: Tensor, out_features: int, in_features: int) -> Tensor:
    """The 2:4 weight as a dense (N, K) matrix, zero-padded to multiples of 64 on both sides."""
    from ..sparse.sparse24 import value_columns

    n_pad = -(-max(out_features, 1) // _SEMI_PAD) * _SEMI_PAD
    k4 = meta.shape[0] * 8
    k_pad = -(-max(in_features, k4, 1) // _SEMI_PAD) * _SEMI_PAD
    w = torch.zeros(n_pad, k_pad, dtype=values.dtype, device=values.device)
    w[:out_features].scatter_(1, value_columns(meta).t(), values.detach().t())
    return w


def _to_semi_structured(dense: Tensor):
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    kind, _ = _semi_structured_kind()
    cls = SparseSemiStructuredTensorCUSPARSELT if kind == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    return cls.from_dense(dense)


def _check_sparse24_args(x, values, meta, out_features, bias) -> None:
    op = "pyprune::sparse24_linear"
    if x.dim() < 1:
        raise ValueError(
            f"{op}: argument 'x' must have at least 1 dimension (..., in_features), got a scalar"
        )
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: argument 'values' must be {x.dtype} (x's dtype), got {values.dtype}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"{op}: argument 'meta' must be torch.uint8, got {meta.dtype}")
    k4 = -(-x.shape[-1] // 8) * 8
    if tuple(values.shape) != (k4 // 2, out_features) or tuple(meta.shape) != (k4 // 8, out_features):
        raise ValueError(
            f"{op}: values must be (K4/2, N) = ({k4 // 2}, {out_features}) and meta (K4/8, N) = "
            f"({k4 // 8}, {out_features}), got {tuple(values.shape)} and {tuple(meta.shape)}"
        )
    tensors = [x, values, meta] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(
            f"{op}: x, values, meta and bias must share a device, got {[str(t.device) for t in tensors]}"
        )
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1 or bias.numel() != out_features):
        raise ValueError(f"{op}: argument 'bias' must be a ({out_features},) {x.dtype} tensor")


def _sparse24_semi(x, values, meta, out_features, bias):
    _check_sparse24_args(x, values, meta, out_features, bias)
    k = x.shape[-1]

    def convert():
        dense = _sparse24_to_padded_dense(values, meta, out_features, k)
        return _to_semi_structured(dense), dense.shape[0], dense.shape[1]

    w_semi, n_pad, k_pad = _SEMI_CACHE.get((values, meta), convert)
    x2 = rows2d(x)
    if k_pad != k:
        x2 = torch.nn.functional.pad(x2, (0, k_pad - k))
    x2 = x2.contiguous()
    b = None
    if bias is not None:
        b = torch.nn.functional.pad(bias, (0, n_pad - out_features)) if n_pad != out_features else bias
    y = torch.nn.functional.linear(x2, w_semi, b)
    if n_pad != out_features:
        y = y[:, :out_features]
    return y.reshape(*x.shape[:-1], out_features)


def _sparse24_reference(x, values, meta, out_features, bias):
    _check_sparse24_args(x, values, meta, out_features, bias)
    return reference.sparse24_linear_ref(x, values, meta, out_features, bias)


SPARSE24_LINEAR_BACKENDS = [
    Backend("cuda", _sparse24_semi, sparse24_semi_unavailable),
    Backend("reference", _sparse24_reference),
]

# ---- pruned_conv2d -------------------------------------------------------------------------------------


def _pruned_conv2d_reference(*args):
    from .pruned_conv2d import pruned_conv2d_checked_ref

    return pruned_conv2d_checked_ref(*args)


def _pruned_conv2d_checked(fn, fuses_epilogue: bool = False):
    """Runs the op's full argument checks, index values included (one device sync), before fn: a bad index
    never reaches a kernel, which would read or write out of bounds. fn takes relu_max and residual as
    keywords when ``fuses_epilogue`` (the Triton kernel); otherwise the cap is a clamp after it, and a residual
    is added after it (the kernel then leaves out the ReLU)."""

    def run(x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu,
            max_pool=(), relu_max=None, residual=None):  # fmt: skip
        from .pruned_conv2d import check_args, check_index_values  # that module imports this one

        args = (x, weight, bias, in_index, out_index, out_channels, stride, padding, dilation, groups, relu)
        check_args(*args, max_pool, relu_max, residual)
        check_index_values(in_index, out_index, x.shape[1], out_channels)
        if fuses_epilogue:
            y = fn(*args, relu_max=relu_max, residual=residual)
        elif residual is not None:
            y = fn(*args[:-1], False).add_(residual)
            if relu:
                y = y.relu_() if relu_max is None else y.clamp_(0, relu_max)
        else:
            y = fn(*args)
            if relu_max is not None:  # the CUDA kernel fuses the ReLU but not its cap: one more pass over y
                y = y.clamp_max_(relu_max)
        if not max_pool:
            return y
        # the GPU kernels have no pool epilogue: ATen's (cuDNN's) pool after them
        y = torch.nn.functional.max_pool2d(y, max_pool[:2], max_pool[2:4], max_pool[4:])
        return y.contiguous(memory_format=reference._memory_format(x))

    return run


def _pruned_conv2d_triton(*args, relu_max=None, residual=None):
    mod, _ = load_triton_kernels()
    return mod.pruned_conv2d_triton(*args, relu_max=relu_max, residual=residual)


def _pruned_conv2d_triton_unavailable(x, *args) -> str | None:
    return triton_unavailable("pruned_conv2d_triton", "pruned_conv2d", x.dtype)


_PRUNED_CONV2D_CUDA_OP = "pyprune::_pruned_conv2d_cuda"


def _pruned_conv2d_cuda(*args):
    return torch.ops.pyprune._pruned_conv2d_cuda(*args)


def _pruned_conv2d_cuda_unavailable(x, *args) -> str | None:
    return _cuda_kernel_unavailable(_PRUNED_CONV2D_CUDA_OP, "pruned_conv2d.cu", x)


PRUNED_CONV2D_BACKENDS = [
    Backend("triton", _pruned_conv2d_checked(_pruned_conv2d_triton, True), _pruned_conv2d_triton_unavailable),
    Backend("cuda", _pruned_conv2d_checked(_pruned_conv2d_cuda), _pruned_conv2d_cuda_unavailable),
    Backend("reference", _pruned_conv2d_reference),
]

_TABLES = {
    "bsr_linear": BSR_LINEAR_BACKENDS,
    "_bsr_linear_grad_values": BSR_GRAD_VALUES_BACKENDS,
    "csr_linear": CSR_LINEAR_BACKENDS,
    "sparse24_linear": SPARSE24_LINEAR_BACKENDS,
    "pruned_conv2d": PRUNED_CONV2D_BACKENDS,
}


def register_cuda(op: str) -> None:
    """Registers the router as the CUDA kernel of ``pyprune::<op>`` (called at the bottom of ops/<op>.py)."""
    torch.library.impl(f"pyprune::{op}", "CUDA")(route(op, _TABLES[op]))


__all__ = [
    "BACKEND_NAMES",
    "BSR_GRAD_VALUES_BACKENDS",
    "BSR_LINEAR_BACKENDS",
    "CSR_LINEAR_BACKENDS",
    "ENV_VAR",
    "PRUNED_CONV2D_BACKENDS",
    "SPARSE24_LINEAR_BACKENDS",
    "Backend",
    "TensorCache",
    "check_bsr_index_values",
    "check_csr_index_values",
    "get_backend",
    "load_triton_kernels",
    "pick",
    "register_cuda",
    "route",
    "sparse24_semi_unavailable",
    "use_backend",
]
