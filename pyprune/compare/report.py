"""The compare report: rows of dicts; a text / rich table with a why-line per row; JSON and CSV with an
environment fingerprint; per-layer tables, break-even sparsities and advice; PNG plots (:mod:`.plots`)."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from .roofline import break_even

COLUMNS = (
    "method", "level", "median ms", "p10-p90 ms", "speedup", "params", "kept", "FLOPs", "GFLOP/s", "% peak",
    "bound", "% roof", "memory", "note",
)  # fmt: skip
_LEFT = {0, 10, 13}

CSV_FIELDS = (
    "model", "method", "level", "median_ms", "p10_ms", "p90_ms", "speedup", "speedup_p10", "speedup_p90",
    "noisy", "params", "prunable_kept", "flops", "flops_executed", "bytes", "memory_bytes", "achieved_gflops",
    "frac_peak", "intensity", "bound", "frac_roofline", "kernels", "page_faults", "note",
)  # fmt: skip
ENV_FIELDS = (
    "device", "cpu", "isa", "cpu_flags", "cpu_count", "threads", "torch", "triton", "python", "gpu", "git_commit",
    "peak_gflops", "peak_engine", "mm_gflops", "conv1x1_gflops", "copy_gbps", "loadavg_start", "loadavg_end",
    "memory_format",
)  # fmt: skip

# the SIMD extensions that decide which kernels run (pyprune's C++ dispatch, oneDNN's and MKL's)
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")  # fmt: skip

CAPTION = (
    "speedup = median over interleaved rounds of time(dense)/time(variant); noisy = (p90-p10)/median > 0.2; "
    "kept = nonzero Linear/Conv2d weights / dense; FLOPs = useful FLOPs (multiply-adds with a nonzero weight, "
    "x2; sparse variants do not get credit for multiplying zeros); GFLOP/s and % peak from those, vs the dense "
    "matmul rate measured in this run; bound = compute or memory on paper (intensity vs machine balance); "
    "% roof = roofline floor / time; memory = parameters + buffers as stored"
)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _cpuinfo() -> dict:
    out = {"model": None, "flags": set()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and out["model"] is None:
                    out["model"] = val.strip()
                elif key in ("flags", "Features") and not out["flags"]:
                    out["flags"] = set(val.split())
    except OSError:
        pass
    return out


def _cpu_model() -> str:
    return _cpuinfo()["model"] or platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def loadavg() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def environment(threads: int, device: str) -> dict:
    """Where and with what a run was measured (stored in the JSON and in every CSV row)."""
    from .. import _extension

    feats = _extension.cpu_features()
    info = _cpuinfo()
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device) if device.startswith("cuda") else 0)
    return {
        "device": device,
        "cpu": info["model"] or platform.processor() or platform.machine(),
        "isa": feats.get("kernel_isa", "none (C++ extension not built)"),
        "cpu_flags": " ".join(f for f in _ISA_FLAGS if f in info["flags"]),
        "cpu_features": feats,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "gpu": gpu,
        "git_commit": _git_commit(),
        "loadavg_start": loadavg(),
    }


def _level(lv) -> str:
    return "-" if lv is None else f"{lv:.2f}"


def _cells(r: dict) -> list[str]:
    level = _level(r["level"])
    if r.get("median_s") is None:
        return [r["method"], level, "n/a"] + [""] * 10 + [r.get("note", "")]
    note = r.get("note", "")
    if r["noisy"]:
        note = ("noisy; " + note) if note else "noisy"
    return [
        r["method"],
        level,
        f"{r['median_s'] * 1e3:.3f}",
        f"{r['p10_s'] * 1e3:.3f}-{r['p90_s'] * 1e3:.3f}",
        f"{r['speedup']:.2f}x",
        _si(r["params"]),
        "-" if r["prunable_kept"] is None else f"{r['prunable_kept']:.2f}",
        _si(r["flops"]),
        f"{r['achieved_gflops']:.1f}",
        f"{r['frac_peak']:.0%}",
        r["bound"],
        f"{r['frac_roofline']:.0%}",
        f"{r['memory_bytes'] / 2**20:.1f}MiB",
        note,
    ]


def _fixed_table(header: list[str], rows: list[list[str]], left: set[int]) -> list[str]:
    body = [header] + rows
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    lines = []
    for j, row in enumerate(body):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


@dataclass
class Report:
    """``rows``: one dict per (method, level) with median_s, p10_s, p90_s, speedup (vs dense, median of
    same-round ratios) and its p10/p90, noisy, params, flops (useful), flops_executed, bytes, memory_bytes,
    prunable_kept, achieved_gflops, frac_peak, intensity, bound, floor_s, frac_roofline, explain, kernels (the
    ops that took the most self time), times_s (raw per-round samples), note, and with ``per_layer`` a
    ``layers`` dict {name: {kind, shape, time_s, flops, bytes, intensity, bound, ...}}. ``environment``
    includes the measured ``peak_gflops`` and ``copy_gbps``."""

    rows: list[dict]
    environment: dict = field(default_factory=dict)
    model: str = ""
    models: dict = field(default_factory=dict, repr=False, compare=False)  # compare(keep_models=True)

    # ---- text ---------------------------------------------------------------------------------------------
    def header(self) -> str:
        e = self.environment
        s = (
            f"{self.model} on {e.get('device')}: {e.get('cpu')} ({e.get('isa')}), {e.get('threads')} threads, "
            f"torch {e.get('torch')}, commit {e.get('git_commit')}"
        )
        if e.get("memory_format") == "channels_last":
            s += "; channels_last input"
        if "peak_gflops" in e:
            s += f"; measured peak {e['peak_gflops']:.1f} GFLOP/s matmul"
            if e.get("conv1x1_gflops"):  # which dense engine set it, and the other one's rate
                s += f" (torch.mm {e['mm_gflops']:.1f}, oneDNN 1x1 conv {e['conv1x1_gflops']:.1f})"
            s += f", {e['copy_gbps']:.1f} GB/s copy"
        if e.get("loadavg_start"):
            s += f"; load average {e['loadavg_start'].split()[0]} at start"
        return s

    def table(self) -> str:
        """Plain-text table (fixed-width columns), then one line per row saying why it takes its time."""
        lines = [self.header()]
        lines += _fixed_table(list(COLUMNS), [_cells(r) for r in self.rows], _LEFT)
        lines.append(CAPTION)
        lines += self.explanations()
        return "\n".join(lines)

    def explanations(self) -> list[str]:
        out = []
        for r in self.rows:
            if r.get("median_s") is not None and "explain" in r:
                out.append(
                    f"  {r['method']}@{_level(r['level'])}: {r['explain']}; ran {r.get('kernels', '?')}"
                )
        return ["why:"] + out if out else []

    def print(self) -> None:
        """Print with rich when it is installed, else the plain table."""
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(self.table())
            return
        t = Table(title=self.header(), caption=CAPTION)
        for i, c in enumerate(COLUMNS):
            t.add_column(c, justify="left" if i in _LEFT else "right", no_wrap=i != len(COLUMNS) - 1)
        for r in self.rows:
            t.add_row(*_cells(r))
        # a pipe or a CI log gets a wide table instead of notes wrapped to 80 columns
        console = Console(width=None if sys.stdout.isatty() else 220)
        console.print(t)
        for line in self.explanations():
            console.print(line, markup=False, highlight=False, soft_wrap=True)

    # ---- per layer ----------------------------------------------------------------------------------------
    def has_layers(self) -> bool:
        return any("layers" in r for r in self.rows)

    def _row(self, method: str, level) -> dict | None:
        for r in self.rows:
            if r["method"] == method and r["level"] == level and r.get("median_s") is not None:
                return r
        return None

    def break_even(self) -> dict[str, dict[str, float | None]]:
        """{method: {layer: sparsity at which that method's layer time equals dense}} for the sparse methods
        (csr, bsr, 2:4, torch.sparse), fitted over the levels measured (see :func:`.roofline.break_even`)."""
        dense = self._row("dense", None)
        if dense is None or "layers" not in dense:
            return {}
        out: dict[str, dict[str, float | None]] = {}
        for method in ("csr", "bsr", "2:4", "torch.sparse"):
            rows = [r for r in self.rows if r["method"] == method and "layers" in r]
            if not rows:
                continue
            per = {}
            for name, d in dense["layers"].items():
                pts = []
                for r in rows:
                    lay = r["layers"].get(name)
                    if lay and lay.get("time_s") and not _dense_kind(lay["kind"]):
                        pts.append((r["level"], lay["time_s"]))
                if pts and d.get("time_s"):
                    per[name] = break_even(d["time_s"], pts)
            if per:
                out[method] = per
        return out

    def layer_table(self, method: str, level: float | None) -> str:
        """Per-layer text: dense vs ``method`` at ``level``: times, speedup, intensity, bound, break-even."""
        dense, row = self._row("dense", None), self._row(method, level)
        for r in self.rows if row is None else ():
            note = r.get("note") or ""
            if (r["method"], r["level"]) == (method, level) and note.startswith("n/a: "):
                raise ValueError(f"{self.model}: method={method!r} level={level} did not run: {note[5:]}")
        if dense is None or row is None or "layers" not in row:
            raise ValueError(
                f"no per-layer data for method={method!r} level={level}; run compare(..., per_layer=True) "
                "with that method and level"
            )
        be = self.break_even().get(method, {})
        body = []
        for name, lay in row["layers"].items():
            d = dense["layers"].get(name, {})
            t, td = lay.get("time_s"), d.get("time_s")
            b = be.get(name)
            body.append([
                name, lay["kind"], lay["shape"],
                f"{td * 1e3:.3f}" if td else "-", f"{t * 1e3:.3f}" if t else "-",
                f"{td / t:.2f}x" if t and td else "-",
                f"{lay.get('intensity', float('nan')):.1f}", lay.get("bound", "-"),
                f"{lay.get('frac_roofline', float('nan')):.0%}",
                "-" if name not in be else ("never" if b is None else f"{b:.2f}"),
            ])  # fmt: skip
        head = ["layer", "kind", "shape", "dense ms", f"{method} ms", "speedup", "FLOP/B", "bound", "% roof",
                "break-even"]  # fmt: skip
        lines = [f"{self.model}: per layer, {method} at {_level(level)} vs dense"]
        lines += _fixed_table(head, body, {0, 1, 2, 7})
        lines.append(
            "FLOP/B = useful FLOPs / (weights + activations in and out); break-even = sparsity at which this "
            "layer's sparse kernel matches dense (time fitted as a + b*density over the levels measured; "
            "'never' = no crossing)"
        )
        return "\n".join(lines)

    def advice(self) -> list[dict]:
        """Per level: the fastest whole-model variant, and per weight layer the fastest form among dense and
        the sparse layouts measured (needs per-layer data for the layer part).

        Returns ``[{"level", "model_best", "model_speedup", "layers": {name: {"best", "time_s", "dense_s",
        "speedup"}}, "layer_sum_s", "dense_sum_s"}]``."""
        dense = self._row("dense", None)
        levels = sorted({r["level"] for r in self.rows if r["level"] is not None})
        out = []
        for lv in levels:
            rows = [r for r in self.rows if r["level"] == lv and r.get("median_s") is not None]
            if not rows:
                continue
            best = max(rows, key=lambda r: r["speedup"])
            entry = {
                "level": lv,
                "model_best": best["method"] if best["speedup"] > 1.0 else "dense",
                "model_speedup": max(best["speedup"], 1.0),
                "layers": {},
            }
            if dense is not None and "layers" in dense:
                cands = [
                    r for r in rows if r["method"] in ("csr", "bsr", "2:4", "torch.sparse") and "layers" in r
                ]
                for name, d in dense["layers"].items():
                    if not d.get("time_s"):
                        continue
                    choice, t_best = "dense", d["time_s"]
                    for r in cands:
                        lay = r["layers"].get(name)
                        if (
                            lay
                            and lay.get("time_s")
                            and not _dense_kind(lay["kind"])
                            and lay["time_s"] < t_best
                        ):
                            choice, t_best = r["method"], lay["time_s"]
                    entry["layers"][name] = {
                        "best": choice, "time_s": t_best, "dense_s": d["time_s"], "speedup": d["time_s"] / t_best,
                    }  # fmt: skip
                entry["layer_sum_s"] = sum(v["time_s"] for v in entry["layers"].values())
                entry["dense_sum_s"] = sum(v["dense_s"] for v in entry["layers"].values())
            out.append(entry)
        return out

    def advice_text(self, per_layer: bool = True) -> str:
        lines = [f"{self.model}: advice"]
        for a in self.advice():
            lines.append(
                f"at sparsity {a['level']:.2f}: fastest whole model: {a['model_best']} ({a['model_speedup']:.2f}x)"
            )
            if a["layers"]:
                counts: dict[str, int] = {}
                for v in a["layers"].values():
                    counts[v["best"]] = counts.get(v["best"], 0) + 1
                mix = ", ".join(f"{n} layers {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                lines.append(
                    f"  per layer: {mix}; weight layers {a['dense_sum_s'] * 1e3:.2f} ms dense -> "
                    f"{a['layer_sum_s'] * 1e3:.2f} ms with the best form each"
                )
                if per_layer:
                    for name, v in a["layers"].items():
                        lines.append(f"    {name}: {v['best']} ({v['speedup']:.2f}x)")
        return "\n".join(lines)

    # ---- files --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"model": self.model, "environment": self.environment, "rows": self.rows}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def _env_cells(self) -> dict:
        return {f"env_{k}": self.environment.get(k) for k in ENV_FIELDS}

    def to_csv(self, path: str | os.PathLike) -> None:
        """One line per variant; the environment fingerprint repeats in ``env_*`` columns so files from
        different machines concatenate."""
        env = self._env_cells()
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS) + list(env))
            w.writeheader()
            for r in self.rows:
                cells = {k: r.get(k) for k in CSV_FIELDS}
                cells.update(model=self.model, level=r["level"])
                for k in ("median", "p10", "p90"):
                    v = r.get(f"{k}_s")
                    cells[f"{k}_ms"] = None if v is None else v * 1e3
                w.writerow({**cells, **env})

    def layers_to_csv(self, path: str | os.PathLike) -> None:
        """One line per (variant, weight layer), with break-even sparsities for the sparse methods."""
        be = self.break_even()
        fields = ["model", "method", "level", "layer", "kind", "shape", "time_ms", "flops", "bytes", "intensity",
                  "bound", "frac_roofline", "break_even"]  # fmt: skip
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields + list(self._env_cells()))
            w.writeheader()
            for r in self.rows:
                for name, lay in r.get("layers", {}).items():
                    t = lay.get("time_s")
                    w.writerow({
                        "model": self.model, "method": r["method"], "level": r["level"], "layer": name,
                        "kind": lay["kind"], "shape": lay["shape"], "time_ms": None if t is None else t * 1e3,
                        "flops": lay["flops"], "bytes": lay["bytes"], "intensity": lay.get("intensity"),
                        "bound": lay.get("bound"), "frac_roofline": lay.get("frac_roofline"),
                        "break_even": be.get(r["method"], {}).get(name), **self._env_cells(),
                    })  # fmt: skip

    def plot(self, directory: str | os.PathLike) -> list[str]:
        """Write PNGs into ``directory`` (created): speedup vs sparsity, roofline, per-layer speedups."""
        from .plots import plot_report

        return plot_report(self, directory)

    def save(self, directory: str | os.PathLike, plots: bool = True) -> list[str]:
        """Write ``compare_<model>.txt/.json/.csv`` (+ ``_layers.csv``, advice and PNGs) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        stem = os.path.join(directory, f"compare_{_slug(self.model)}")
        paths = [stem + ".txt", stem + ".json", stem + ".csv"]
        with open(paths[0], "w") as f:
            f.write(self.table() + "\n\n" + self.advice_text(per_layer=False) + "\n")
        self.to_json(paths[1])
        self.to_csv(paths[2])
        if self.has_layers():
            paths.append(stem + "_layers.csv")
            self.layers_to_csv(paths[-1])
        if plots:
            paths += self.plot(directory)
        return paths


def _dense_kind(kind: str) -> bool:
    """Dense storage (plain or masked): not a sparse form the advice could pick."""
    return kind.split("+")[0] in ("Linear", "Conv2d")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower() or "model"
