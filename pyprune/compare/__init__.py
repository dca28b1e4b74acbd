"""``pyprune.compare``: time structured and unstructured pruning of one model side by side, on this machine.

Every variant (see :mod:`.variants` for what each is) is timed in the same run, on the same inputs, at one
fixed thread count, in interleaved rounds (:mod:`.timing`); the machine's dense matmul rate and copy bandwidth
are measured once per run (:mod:`.roofline`) so every row can say how close it gets to what the hardware allows
and why (:mod:`.work` counts the useful FLOPs and the bytes). ``per_layer=True`` adds each weight layer's time
per variant, from which the report derives break-even sparsities and per-layer advice.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..pruning.masks import copy_of
from .report import Report, environment, loadavg
from .roofline import explain, measure_peak, place
from .timing import Progress, fixed_threads, page_faults, summarize, time_interleaved
from .variants import METHODS, Builder, NotApplicable, kept_weights, prunable_weights, stored_params
from .work import measure_work, time_layers

__all__ = ["METHODS", "NotApplicable", "Report", "compare", "measure_peak"]

# errors a variant may raise when it cannot run on this model / device; the row says so instead of crashing
_VARIANT_ERRORS = (NotApplicable, NotImplementedError, RuntimeError, ValueError, TypeError)


def _args(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _memory_format(model: nn.Module, args: tuple) -> str | None:
    """How the images flow: "channels_last" when a 4-D input or a conv weight is laid out so (and not
    trivially NCHW too; as for F.conv2d, either makes the convs' outputs channels_last), else "contiguous";
    None without a 4-D input."""
    images = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
    if not images:
        return None
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    cl = any(
        t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in images + weights
    )
    return "channels_last" if cl else "contiguous"


def _pool_hint(kernels: str, memory_format: str | None) -> str:
    """A pointer to channels_last, or to pyprune.nn.MaxPool2d, when ATen's NCHW max pool takes a large share of
    an NCHW run (its CPU kernel walks each plane scalar; the channels_last one is vectorized over channels:
    2.43 vs 0.14 ms for ResNet-50's stem pool on the Zen 5 VM; pyprune's NCHW pool 0.14 ms against ATen's
    4.7 ms on the Xeon VM)."""
    m = re.search(r"aten::max_pool2d\w* (\d+)%", kernels or "")
    if memory_format != "contiguous" or m is None or int(m.group(1)) < 20:
        return ""
    return (
        f"; ATen's NCHW max pool takes {m.group(1)}% of it, and is many times faster on channels_last input: "
        "try --channels-last (model and input .to(memory_format=torch.channels_last)), or swap the model's "
        "nn.MaxPool2d for pyprune.nn.MaxPool2d.from_dense(pool)"
    )


# minor page faults a forward past which the report says so (~1 us each on the Xeon VM: 1,000 are a
# millisecond, whole convs' worth at batch 1)
_FAULTS_NOTED = 200


def _fault_hint(faults: float | None) -> str:
    """A note when a variant's forward faults its buffers in again on every call: that time is the allocator's
    and the process's heap (oneDNN's NCHW convs took ~1,400-1,700 faults a call in one process and none in
    another), not the kernels', and may not repeat in the next run."""
    if faults is None or faults < _FAULTS_NOTED:
        return ""
    return (
        f"; {faults:.0f} minor page faults a forward (buffers handed back to the system and faulted in again "
        "each call: time that moves with the process's heap, not the kernels)"
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch.device for ``device``, or ValueError naming the valid choices on this machine."""
    valid = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: unknown device {device!r}; valid devices here are {valid}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not supported; valid devices here are {valid}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device: {device!r} requested but no CUDA GPU is available (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False); valid devices here are {valid}"
        )
    return dev


def _check(methods, levels, rounds, threads, device, budget_s):
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods: unknown {bad}; valid methods are {list(METHODS)}")
    levels = tuple(float(x) for x in levels)
    for x in levels:
        if not (0.0 < x < 1.0) or math.isnan(x):
            raise ValueError(f"levels must lie in the open interval (0, 1), got {x}")
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    if not budget_s >= 0:  # NaN too
        raise ValueError(f"budget_s must be >= 0 (seconds), got {budget_s}")
    return methods, levels, resolve_device(device)


def _variants(methods, levels) -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = [("dense", None)]
    for lv in levels:
        for m in methods:
            if m not in ("dense", "2:4"):
                out.append((m, lv))
    if "2:4" in methods:  # fixed density 1/2: one row, at level 0.5, whatever the levels
        out.append(("2:4", 0.5))
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side logs a start/stop line per session there)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _kernels(mod: nn.Module, args: tuple, device: str = "cpu", top: int = 3) -> str:
    """The ops that took the most self time in one profiled forward: what actually ran ("[cpp]" / "[python]"
    after a pyprune op says whether its compiled kernel or the Python reference ran)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if any(a.is_cuda for a in args if isinstance(a, torch.Tensor)):
        acts.append(ProfilerActivity.CUDA)
    with _quiet_stderr(), profile(activities=acts) as prof:
        mod(*args)
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    from .profile import op_backend

    def label(key: str) -> str:
        if key.startswith("pyprune::") and "/" not in key:
            return f"{key}[{op_backend(key.split('::', 1)[1], device)}]"
        return key

    return ", ".join(f"{label(e.key)} {e.self_cpu_time_total / total:.0%}" for e in events[:top])


def _na(method, level, why: str) -> dict:
    return {"method": method, "level": level, "median_s": None, "note": f"n/a: {why}"}


def compare(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    methods: Iterable[str] = METHODS,
    levels: Iterable[float] = (0.5, 0.75, 0.9),
    device: str = "cpu",
    threads: int | None = None,
    rounds: int = 7,
    budget_s: float = 30.0,
    block: tuple[int, int] = (32, 32),
    name: str | None = None,
    seed: int = 0,
    per_layer: bool = False,
    layer_repeats: int = 5,
    peak: dict | None = None,
    progress: bool = False,
    keep_models: bool = False,
) -> Report:
    """Time dense, masked, channel-pruned and sparse-converted variants of ``model`` in one interleaved run.

    Args:
        model: the network (put in eval mode; not modified: every variant is a copy).
        example_inputs: a tensor or tuple of tensors, the positional arguments of ``model.forward``; every
            variant runs on these same tensors.
        methods: a subset of ``METHODS``; "dense" is always timed as the baseline. Levels are sparsities in
            (0, 1): the fraction of Linear/Conv2d weights removed (channel: matched by parameter count).
        device: "cpu" or "cuda" (ValueError when no GPU is available).
        threads: torch threads for the whole comparison (default: the current setting); restored afterwards.
        rounds: interleaved rounds (each times every variant once, in a shuffled order).
        budget_s: time budget for the timing rounds; after at least 2 rounds, rounds stop once it is spent.
        block: BSR tile (bh, bw).
        per_layer: also time every weight layer of every variant (``layer_repeats`` forward passes each).
        peak: a :func:`measure_peak` result to reuse (default: measured here, once).
        progress: report progress on stderr (a rich bar on a terminal).
        keep_models: keep the built variants in ``report.models`` {(method, level): module} (not serialised).
    Returns:
        a :class:`Report`; rows that do not apply carry ``median_s=None`` and a note ``"n/a: <why>"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    methods, levels, dev = _check(methods, levels, rounds, threads, device, budget_s)
    if int(layer_repeats) < 1:
        raise ValueError(f"layer_repeats must be >= 1, got {layer_repeats}")
    args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in _args(example_inputs))
    model = copy_of(model).to(dev).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    t_start = time.perf_counter()
    with fixed_threads(threads) as nthreads, torch.no_grad(), Progress(progress) as prog:
        env = {**environment(nthreads, str(dev)), "memory_format": _memory_format(model, args)}
        if peak is None:
            prog.stage("measuring the roofline (matmul rate, copy bandwidth)", 1)
            peak = measure_peak(nthreads, str(dev))
            prog.step(f"{peak['peak_gflops']:.1f} GFLOP/s, {peak['copy_gbps']:.1f} GB/s")
        variants = _variants(methods, levels)
        builder = Builder(model, args, block)
        built, info, rows = {}, {}, []
        prog.stage("building variants", len(variants))
        for key in variants:
            try:
                mod, note = builder.build(*key)
                # the first call (counting FLOPs and bytes) also warms it up, and a variant that cannot run
                # here fails now, not in the timing loop; the second one shows which kernels ran
                work = measure_work(mod, args)
                kernels = _kernels(mod, args, str(dev))
            except _VARIANT_ERRORS as exc:
                why = str(exc) if isinstance(exc, NotApplicable) else f"{type(exc).__name__}: {exc}"
                if key == ("dense", None):  # every speedup is against it: nothing to compare
                    raise ValueError(f"the dense model fails on example_inputs: {why}") from exc
                rows.append(_na(*key, why.splitlines()[0][:200] if why else type(exc).__name__))
                prog.step(f"{key[0]}@{key[1]}: n/a")
                continue
            built[key] = (mod, note)
            info[key] = (work, kernels)
            prog.step(f"{key[0]}@{key[1]}")
        env["build_s"] = time.perf_counter() - t_start
        fns = {key: (lambda m=mod: m(*args)) for key, (mod, _) in built.items()}
        samples = time_interleaved(
            {f"{m}@{lv}": fn for (m, lv), fn in fns.items()},
            int(rounds),
            nthreads,
            budget_s,
            seed=seed,
            progress=prog,
            warmed=True,
        )
        faults = {key: page_faults(fn) for key, fn in fns.items()}
        env["timing_s"] = time.perf_counter() - t_start - env["build_s"]
        dense_t = samples["dense@None"]
        dense_w = prunable_weights(model)
        if per_layer:
            prog.stage("timing layers", len(built))
        for (m, lv), (mod, note) in built.items():
            ts = samples[f"{m}@{lv}"]
            work, kernels = info[(m, lv)]
            stats = summarize(ts, dense_t)
            row = {
                "method": m,
                "level": lv,
                **stats,
                "params": stored_params(mod),
                "flops": work["flops"],
                "flops_executed": work["flops_executed"],
                "bytes": work["bytes"],
                "memory_bytes": work["weight_bytes"],
                "prunable_kept": kept_weights(mod) / dense_w if dense_w else None,
                **place(work["flops"], work["bytes"], stats["median_s"], peak),
                "kernels": kernels,
                "page_faults": faults[(m, lv)],
                "times_s": ts,
                "note": note,
            }
            row["explain"] = (
                explain(row, peak) + _pool_hint(kernels, env["memory_format"]) + _fault_hint(row["page_faults"])
            )
            if per_layer:
                times = time_layers(mod, args, int(layer_repeats), sync=sync)
                row["layers"] = {
                    name: {**lay, "time_s": times.get(name), **_place_layer(lay, times.get(name), peak)}
                    for name, lay in work["layers"].items()
                }
                prog.step(f"{m}@{lv}")
            rows.append(row)
    order = {key: i for i, key in enumerate(variants)}
    rows.sort(key=lambda r: order[(r["method"], r["level"])])
    env["wall_s"] = time.perf_counter() - t_start
    env["loadavg_end"] = loadavg()
    report = Report(rows=rows, environment={**env, **peak}, model=name or type(model).__name__)
    if keep_models:
        report.models = {key: mod for key, (mod, _) in built.items()}
    return report


def _place_layer(info: dict, seconds: float | None, peak: dict) -> dict:
    if not seconds:
        return {}
    p = place(info["flops"], info["bytes"], seconds, peak)
    return {k: p[k] for k in ("achieved_gflops", "intensity", "bound", "frac_roofline")}
