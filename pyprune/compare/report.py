"""The compare report: rows of dicts, a text / rich table, JSON with an environment fingerprint."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field

import torch

COLUMNS = ("method", "level", "median ms", "p10-p90 ms", "speedup", "params", "kept", "FLOPs", "note")


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(threads: int, device: str) -> dict:
    from .. import _extension

    feats = _extension.cpu_features()
    return {
        "device": device,
        "cpu": _cpu_model(),
        "isa": feats.get("kernel_isa", "none (C++ extension not built)"),
        "cpu_features": feats,
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
    }


def _cells(r: dict) -> list[str]:
    level = "-" if r["level"] is None else f"{r['level']:.2f}"
    if r.get("median_s") is None:
        return [r["method"], level, "n/a", "", "", "", "", "", r.get("note", "")]
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
        f"{r['prunable_kept']:.2f}",
        _si(r["flops"]),
        note,
    ]


@dataclass
class Report:
    """``rows``: one dict per (method, level) with median_s, p10_s, p90_s, speedup (vs dense, median of
    same-round ratios), noisy, params, flops, prunable_kept, times_s (raw per-round samples) and note."""

    rows: list[dict]
    environment: dict = field(default_factory=dict)
    model: str = ""

    def header(self) -> str:
        e = self.environment
        return (
            f"{self.model} on {e.get('device')}: {e.get('cpu')} ({e.get('isa')}), {e.get('threads')} threads, "
            f"torch {e.get('torch')}, commit {e.get('git_commit')}"
        )

    def table(self) -> str:
        """Plain-text table (fixed-width columns)."""
        body = [list(COLUMNS)] + [_cells(r) for r in self.rows]
        widths = [max(len(row[i]) for row in body) for i in range(len(COLUMNS))]
        lines = [self.header()]
        for j, row in enumerate(body):
            lines.append(
                "  ".join(
                    c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
                ).rstrip()
            )
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(
            "speedup = median over interleaved rounds of time(dense)/time(variant); "
            "noisy = (p90-p10)/median > 0.2; "
            "kept = nonzero Linear/Conv2d weights / dense"
        )
        return "\n".join(lines)

    def print(self) -> None:
        """Print with rich when it is installed, else the plain table."""
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(self.table())
            return
        t = Table(
            title=self.header(),
            caption="speedup = median over interleaved rounds of "
            "time(dense)/time(variant); noisy = (p90-p10)/median > 0.2; kept = nonzero "
            "Linear/Conv2d weights / dense",
        )
        for i, c in enumerate(COLUMNS):
            t.add_column(c, justify="left" if i in (0, 8) else "right", no_wrap=i != 8)
        for r in self.rows:
            t.add_row(*_cells(r))
        # a pipe or a CI log gets a wide table instead of notes wrapped to 80 columns
        Console(width=None if sys.stdout.isatty() else 200).print(t)

    def to_dict(self) -> dict:
        return {"model": self.model, "environment": self.environment, "rows": self.rows}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
