"""Interleaved timing: every variant is timed in every round, in a shuffled order, so drift on a shared machine
hits all variants alike; speedups are the median over rounds of the same-round ratio time(dense) / time(v)."""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils import benchmark

try:
    import resource
except ImportError:  # not on Windows: no fault counts
    resource = None


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Pin torch's intra-op thread count for the block (default: leave it), restoring it afterwards."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _sample(fn: Callable[[], object], number: int, threads: int) -> float:
    """Seconds per call, averaged over ``number`` back-to-back calls (one torch.utils.benchmark measurement)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.timeit(number).mean


def page_faults(fn: Callable[[], object], calls: int = 3) -> float | None:
    """Minor page faults of the process per call of ``fn`` over ``calls`` calls (None without the resource
    module). Buffers that the allocator handed back to the system are faulted in again page by page on the
    next call; how many depends on the process's heap as much as on the kernels."""
    if resource is None:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


class Progress:
    """Progress reporting on stderr: a rich bar when rich is installed and stderr is a terminal, one line per
    step otherwise; silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._rich = None
        self._task = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RichProgress
            except ImportError:
                return
            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip

    def __enter__(self):
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def stage(self, description: str, total: int) -> None:
        if self._rich is not None:
            if self._task is not None:
                self._rich.remove_task(self._task)
            self._task = self._rich.add_task(description, total=total)
        elif self.enabled:
            print(f"[pyprune compare] {description} ({total})", file=sys.stderr, flush=True)

    def step(self, what: str = "") -> None:
        if self._rich is not None and self._task is not None:
            self._rich.advance(self._task)
        elif self.enabled and what:
            print(f"  {what}", file=sys.stderr, flush=True)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    threads: int,
    budget_s: float,
    seed: int = 0,
    min_rounds: int = 2,
    progress: Progress | None = None,
    warmed: bool = False,
    target_spread: float = 0.1,
) -> dict[str, list[float]]:
    """Per-call seconds of each fn, one sample per round; sample i of every fn comes from round i.

    Each fn is warmed up (unless ``warmed``: the caller already ran it once) and calibrated first so that one
    sample lasts about ``budget_s / (rounds * len(fns))`` (at least 1 call). Rounds stop early, after
    ``min_rounds``, once ``budget_s`` is spent, or after 3 rounds once every fn's (p90 - p10) / median is
    within ``target_spread``.
    """
    progress = progress or Progress(False)
    rng = random.Random(seed)
    per_sample = min(0.25, max(0.005, budget_s / max(1, rounds * len(fns))))
    number = {}
    with torch.no_grad():
        for name, fn in fns.items():
            if not warmed:
                fn()  # warm-up: first-call allocations, lazy init, oneDNN primitive creation
            t0 = time.perf_counter()
            fn()
            est = max(time.perf_counter() - t0, 1e-7)
            number[name] = max(1, math.ceil(per_sample / est))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        progress.stage("timing rounds", rounds)
        start = time.perf_counter()
        for r in range(rounds):
            order = list(fns)
            rng.shuffle(order)
            for name in order:
                samples[name].append(_sample(fns[name], number[name], threads))
            progress.step(f"round {r + 1}/{rounds} ({time.perf_counter() - start:.1f} s)")
            if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
                break
            if r + 1 >= max(3, min_rounds) and all(_spread(ts) <= target_spread for ts in samples.values()):
                break
    return samples


def _spread(times: list[float]) -> float:
    q = statistics.quantiles(times, n=10, method="inclusive")
    return (q[-1] - q[0]) / statistics.median(times)


def summarize(times: list[float], baseline: list[float] | None) -> dict:
    """median / p10 / p90 (linear interpolation), same-round speedup vs ``baseline`` and the noisy flag."""
    med = statistics.median(times)
    if len(times) > 1:
        q = statistics.quantiles(times, n=10, method="inclusive")
        p10, p90 = q[0], q[-1]
    else:
        p10 = p90 = times[0]
    out = {"median_s": med, "p10_s": p10, "p90_s": p90, "noisy": (p90 - p10) / med > 0.2}
    if baseline is not None:
        out["speedup"] = same_round_speedup(baseline, times)
        ratios = [b / t for b, t in zip(baseline, times)]
        if len(ratios) > 1:
            q = statistics.quantiles(ratios, n=10, method="inclusive")
            out["speedup_p10"], out["speedup_p90"] = q[0], q[-1]
        else:
            out["speedup_p10"] = out["speedup_p90"] = ratios[0]
    return out


def same_round_speedup(baseline: list[float], times: list[float]) -> float:
    """Median over rounds of baseline[i] / times[i]."""
    if len(baseline) != len(times):
        raise ValueError(f"need one baseline sample per round, got {len(baseline)} and {len(times)}")
    return statistics.median(b / t for b, t in zip(baseline, times))
