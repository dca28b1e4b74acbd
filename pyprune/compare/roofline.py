"""The machine's roofline, measured once per run, and where a timed variant or layer sits under it.

Two numbers bound every forward pass: the dense matmul rate (FLOP/s of a large fp32 GEMM, the faster of ``torch.mm``
and, on the CPU, oneDNN's 1x1 convolution) and the copy
bandwidth (bytes/s of copying a buffer larger than the last-level cache), both at the run's thread count. A
variant doing ``F`` useful FLOPs and moving at least ``B`` bytes cannot finish before
``max(F / peak_flops, B / bandwidth)`` (the roofline floor); which term is larger says whether it is compute- or
memory-bound on paper, and the measured time over that floor says how much goes to neither (dispatch, small or
irregular kernels, index traffic).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.utils import benchmark


def _best_time(fn, threads: int, repeats: int) -> float:
    """Shortest of ``repeats`` one-call timings after a warm-up (peak rates: the least disturbed run)."""
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return min(timer.timeit(1).mean for _ in range(repeats))


def measure_peak(
    threads: int, device: str = "cpu", n: int = 1024, copy_mib: int = 128, repeats: int = 15
) -> dict:
    """Dense matmul rate and copy bandwidth of ``device`` at ``threads`` torch threads.

    Returns ``{"peak_gflops", "peak_engine", "mm_gflops", "conv1x1_gflops", "copy_gbps", "matmul_n",
    "copy_mib"}``. ``mm_gflops`` = 2 n^3 / time of an (n x n) @ (n x n) fp32 ``torch.mm``; on the CPU
    ``conv1x1_gflops`` is the same GEMM as a channels_last 1x1 ``F.conv2d`` (n channels in and out over an
    s x s map, s = round(sqrt(n))), which oneDNN runs, None elsewhere. ``peak_gflops`` is the faster of the two
    (``peak_engine`` names it): the dense layers of a model run on both engines, and they need not be equally
    fast (on an AMD Zen 5 VM with 2 threads torch.mm (MKL) reached 212 GFLOP/s, the conv 470). ``copy_gbps`` =
    2 * buffer bytes (read + write) / time of ``dst.copy_(src)`` over a ``copy_mib`` MiB fp32 buffer. Every
    figure takes the best of ``repeats`` timings.
    """
    if n < 1 or copy_mib < 1 or repeats < 1:
        raise ValueError(f"n, copy_mib and repeats must be >= 1, got {n}, {copy_mib}, {repeats}")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    mm = 2 * n**3 / _best_time(lambda: torch.mm(a, b), threads, repeats) / 1e9
    conv = None
    if torch.device(device).type == "cpu":  # on CUDA a conv may run in TF32, which an fp32 GEMM peak must not
        side = max(1, round(n**0.5))
        x = torch.randn(1, n, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, n, 1, 1, generator=gen)
        conv = 2 * n * n * side * side / _best_time(lambda: F.conv2d(x, w), threads, repeats) / 1e9
    rates = {"mm": mm} if conv is None else {"mm": mm, "conv1x1": conv}
    engine = max(rates, key=rates.get)
    numel = copy_mib * 2**20 // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    t_copy = _best_time(lambda: dst.copy_(src), threads, repeats)
    return {
        "peak_gflops": rates[engine],
        "peak_engine": engine,
        "mm_gflops": mm,
        "conv1x1_gflops": conv,
        "copy_gbps": 2 * src.numel() * src.element_size() / t_copy / 1e9,
        "matmul_n": n,
        "copy_mib": copy_mib,
    }


def place(flops: float, nbytes: float, seconds: float, peak: dict) -> dict:
    """Where one timed piece of work sits under the roofline.

    Returns achieved_gflops (useful FLOPs / time), frac_peak (of the dense matmul rate), intensity (FLOP/byte),
    bound ("compute" or "memory", from intensity vs the machine balance), floor_s (roofline time) and
    frac_roofline (floor_s / seconds: 1.0 = as fast as this machine allows for this much work)."""
    gflops_peak, gbps = peak["peak_gflops"], peak["copy_gbps"]
    t_compute = flops / (gflops_peak * 1e9)
    t_memory = nbytes / (gbps * 1e9)
    floor = max(t_compute, t_memory)
    achieved = flops / seconds / 1e9 if seconds > 0 else float("nan")
    return {
        "achieved_gflops": achieved,
        "frac_peak": achieved / gflops_peak,
        "intensity": flops / nbytes if nbytes > 0 else float("inf"),
        "bound": "compute" if t_compute >= t_memory else "memory",
        "floor_s": floor,
        "frac_roofline": floor / seconds if seconds > 0 else float("nan"),
    }


def explain(r: dict, peak: dict) -> str:
    """One sentence saying why a row takes the time it takes (needs the fields :func:`place` adds)."""
    balance = peak["peak_gflops"] / peak["copy_gbps"]
    side = "compute" if r["bound"] == "compute" else "memory"
    s = (
        f"{side}-bound on paper (intensity {r['intensity']:.1f} FLOP/B vs machine balance {balance:.1f}); "
        f"at {r['frac_roofline']:.0%} of its roofline floor {r['floor_s'] * 1e3:.2f} ms"
    )
    if r["frac_peak"] > 1.0:
        s += "; above the measured matmul peak: that measurement was disturbed (a busy machine), rerun"
    elif r["frac_roofline"] >= 0.3:
        s += f"; {r['frac_peak']:.0%} of the dense matmul rate" if r["bound"] == "compute" else ""
    else:
        s += (
            "; far below both roofs: the time goes to what the roofline does not count (op dispatch, small "
            "shapes, index or im2col traffic, irregular access)"
        )
    return s


def balance(peak: dict) -> float:
    """Machine balance: FLOPs per byte at which compute and memory time are equal."""
    return peak["peak_gflops"] / peak["copy_gbps"]


def break_even(dense_s: float, points: list[tuple[float, float]]) -> float | None:
    """Sparsity at which a sparse kernel's time equals ``dense_s``, from its measured (sparsity, seconds) points.

    The kernel's time is modelled as ``a + b * density`` (a fixed cost plus work proportional to the kept
    weights): fitted by least squares on two or more levels, or through the origin (``a = 0``) from one. Returns
    None when the fit gives no crossing in [0, 1) (e.g. the kernel never gets cheaper with sparsity), 0.0 when
    the sparse kernel is already faster at density 1."""
    pts = [(1.0 - s, t) for s, t in points if t is not None and t > 0]
    if not pts:
        return None
    if len(pts) == 1:
        d, t = pts[0]
        a, b = 0.0, t / d
    else:
        ds = [d for d, _ in pts]
        ts = [t for _, t in pts]
        md, mt = statistics.fmean(ds), statistics.fmean(ts)
        var = sum((d - md) ** 2 for d in ds)
        if var == 0:
            return None
        b = sum((d - md) * (t - mt) for d, t in pts) / var
        a = mt - b * md
    if b <= 0:
        return None
    density = (dense_s - a) / b
    if density >= 1.0:
        return 0.0
    if density <= 0.0:
        return None
    return 1.0 - density
