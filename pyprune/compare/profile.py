"""Per-layer profile of one variant against dense: the compare harness with per-layer timing, plus a
torch.profiler chrome trace in which every weight layer is a ``layer <name>`` range and every pyprune module
call a ``pyprune::<op>/<backend>`` range (backend = where the dispatcher sends that op on this device)."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .variants import METHODS

# the op each pyprune module calls, by class name and layout (SparseConv2d names its own: kernel_op)
_OPS = {
    ("SparseLinear", "csr"): "csr_linear",
    ("SparseLinear", "bsr"): "bsr_linear",
    ("SparseLinear", "2:4"): "sparse24_linear",
    ("PrunedConv2d", None): "pruned_conv2d",
}


def op_backend(op: str, device: str = "cpu") -> str:
    """Where ``pyprune::<op>`` runs on ``device``: "cpp" (a kernel compiled into pyprune._C), "python" (the
    reference registered from Python when _C lacks the kernel), or on CUDA the router's requested backend
    ("auto" when it picks; the router adds its own range naming the one it ran)."""
    if device.startswith("cuda"):
        from ..ops import _router

        return _router.get_backend() or "auto"
    key = "CPU"
    for line in torch._C._dispatch_dump(f"pyprune::{op}").splitlines():
        if line.startswith(f"{key}:"):
            return "cpp" if ".cpp" in line else "python"
    return "none"


def module_op(m: nn.Module, x: torch.Tensor) -> str | None:
    """The pyprune op ``m`` calls on input ``x``, or None for modules that are not pyprune's."""
    name = type(m).__name__
    if hasattr(m, "kernel_op"):
        return m.kernel_op(x)
    return _OPS.get((name, getattr(m, "layout", None))) or _OPS.get((name, None))


@contextlib.contextmanager
def layer_ranges(model: nn.Module, device: str = "cpu"):
    """Profiler ranges around every weight layer (and ``pyprune::<op>/<backend>`` around pyprune modules)."""
    from .work import kind, weight_layers

    stack: dict[int, list] = {}
    handles = []
    for name, m in weight_layers(model).items():
        layer = f"layer {name} ({kind(m)})"

        def pre(mod, inp, layer=layer):
            labels = [layer]
            op = module_op(mod, inp[0]) if inp else None
            if op is not None:
                labels.append(f"pyprune::{op}/{op_backend(op, device)}")
            rfs = [torch.autograd.profiler.record_function(label) for label in labels]
            for rf in rfs:
                rf.__enter__()
            stack.setdefault(id(mod), []).append(rfs)

        def post(mod, inp, out):
            for rf in reversed(stack[id(mod)].pop()):
                rf.__exit__(None, None, None)

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def write_trace(
    models: dict[str, nn.Module], args: tuple, path: str | os.PathLike, device: str = "cpu"
) -> str:
    """One profiled forward of each model (after a warm-up), each inside a ``variant <key>`` range; writes a
    chrome trace (open it in chrome://tracing or https://ui.perfetto.dev)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.no_grad():
        for m in models.values():
            m(*args)
        with profile(activities=acts, record_shapes=True) as prof:
            for key, m in models.items():
                with torch.autograd.profiler.record_function(f"variant {key}"), layer_ranges(m, device):
                    m(*args)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return str(path)


def profile_variant(
    model: nn.Module,
    example_inputs,
    method: str,
    level: float,
    trace: str | os.PathLike | None = None,
    device: str = "cpu",
    threads: int | None = None,
    rounds: int = 3,
    budget_s: float = 5.0,
    layer_repeats: int = 5,
    peak: dict | None = None,
    progress: bool = False,
    name: str | None = None,
):
    """Compare ``method`` at ``level`` with dense, layer by layer; returns the Report (``report.layer_table``)
    and writes the chrome trace to ``trace`` when given."""
    from . import compare

    if method not in METHODS or method == "dense":
        raise ValueError(f"method: {method!r} is not a pruned variant; valid methods are {list(METHODS[1:])}")
    if method == "2:4":
        level = 0.5
    rep = compare(
        model, example_inputs, methods=("dense", method), levels=(level,), device=device, threads=threads,
        rounds=rounds, budget_s=budget_s, per_layer=True, layer_repeats=layer_repeats, peak=peak,
        progress=progress, keep_models=trace is not None, name=name,
    )  # fmt: skip
    if trace is not None:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _args(example_inputs))
        from .timing import fixed_threads

        with fixed_threads(threads):
            write_trace({f"{m}@{lv}": mod for (m, lv), mod in rep.models.items()}, args, trace, device)
        rep.environment["trace"] = str(trace)
    return rep


def _args(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
