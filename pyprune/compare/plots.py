"""PNG plots of a compare report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("Report.plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _stem(report, directory) -> str:
    from .report import _slug

    return os.path.join(directory, f"compare_{_slug(report.model)}")


def plot_report(report, directory: str | os.PathLike) -> list[str]:
    """Writes ``<stem>_speedup.png``, ``<stem>_roofline.png`` and, with per-layer data, one
    ``<stem>_layers_<level>.png`` per level; returns the paths."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    stem = _stem(report, directory)
    env = report.environment
    subtitle = (
        f"{env.get('cpu')}, threads={env.get('threads')}, {env.get('device')}, commit {env.get('git_commit')}"
    )
    paths = []

    # speedup vs sparsity, one line per method, bars = p10-p90 of the same-round ratios
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = []
    for r in report.rows:
        if r["method"] != "dense" and r["method"] not in methods:
            methods.append(r["method"])
    for m in methods:
        pts = sorted(
            (r["level"], r["speedup"], r.get("speedup_p10", r["speedup"]), r.get("speedup_p90", r["speedup"]))
            for r in report.rows
            if r["method"] == m and r.get("median_s") is not None
        )
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m)
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="dense")
    ax.set_xlabel("sparsity (fraction of Linear/Conv2d weights removed)")
    ax.set_ylabel("speedup vs dense (median of same-round ratios)")
    ax.set_title(f"{report.model}: speedup vs sparsity\n{subtitle}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(stem + "_speedup.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # roofline: achieved useful GFLOP/s vs intensity, under the measured roofs
    if "peak_gflops" in env:
        # on log axes: a variant with no useful FLOPs (every block of a small layer dropped) has no point
        rows = [
            r
            for r in report.rows
            if r.get("median_s") is not None and r.get("intensity", 0) > 0 and r.get("achieved_gflops", 0) > 0
        ]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        peak, bw = env["peak_gflops"], env["copy_gbps"]
        ais = [r["intensity"] for r in rows] or [1.0]
        lo, hi = min(ais + [peak / bw]) / 4, max(ais + [peak / bw]) * 4
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        ax.plot(xs, [min(peak, bw * x) for x in xs], color="black", lw=1.2, label="roofline (measured)")
        for r in rows:
            lv = "" if r["level"] is None else f"@{r['level']:.2f}"
            ax.scatter(r["intensity"], r["achieved_gflops"], s=20)
            ax.annotate(f"{r['method']}{lv}", (r["intensity"], r["achieved_gflops"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (useful FLOP / byte)")
        ax.set_ylabel("achieved useful GFLOP/s")
        ax.set_title(f"{report.model}: roofline\n{subtitle}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(stem + "_roofline.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    if report.has_layers():
        paths += _layer_heatmaps(plt, report, stem, subtitle)
    return paths


def _layer_heatmaps(plt, report, stem: str, subtitle: str) -> list[str]:
    """Per level, layers x methods, colour = speedup of that layer vs its dense time (log scale)."""
    import math

    dense = next((r for r in report.rows if r["method"] == "dense" and "layers" in r), None)
    if dense is None:
        return []
    names = [n for n, v in dense["layers"].items() if v.get("time_s")]
    paths = []
    for lv in sorted({r["level"] for r in report.rows if r["level"] is not None}):
        rows = [r for r in report.rows if r["level"] == lv and "layers" in r]
        if not rows or not names:
            continue
        grid = []
        for n in names:
            td = dense["layers"][n]["time_s"]
            line = []
            for r in rows:
                t = r["layers"].get(n, {}).get("time_s")
                line.append(math.log2(td / t) if t else float("nan"))
            grid.append(line)
        fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 4, 0.18 * len(names) + 2))
        im = ax.imshow(grid, aspect="auto", cmap="RdBu", vmin=-3, vmax=3, interpolation="nearest")
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=max(3, min(8, 400 // max(1, len(names)))))
        cb = fig.colorbar(im, ax=ax)
        cb.set_label("log2 speedup of the layer vs dense")
        ax.set_title(f"{report.model}: per-layer speedup at sparsity {lv:.2f}\n{subtitle}", fontsize=9)
        fig.tight_layout()
        paths.append(f"{stem}_layers_{round(lv * 100)}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
