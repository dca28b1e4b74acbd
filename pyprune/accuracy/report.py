"""The accuracy report: one row per (method, level) with accuracy before / after fine-tuning, params, FLOPs and
the latency and speedup measured in the same run; markdown / rich table, JSON, CSV and a Pareto plot."""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field

COLUMNS = (
    "method",
    "level",
    "FLOPs",
    "FLOPs removed",
    "params",
    "acc before",
    "acc after",
    "ms",
    "speedup",
    "note",
)
CSV_FIELDS = (
    "method",
    "level",
    "kind",
    "flops",
    "nnz_flops",
    "flops_removed",
    "params",
    "acc_before",
    "acc_after",
    "median_s",
    "p10_s",
    "p90_s",
    "speedup",
    "noisy",
    "note",
)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _cells(r: dict) -> list[str]:
    level = "-" if r.get("level") is None else f"{r['level']:g}"
    if "acc_after" not in r:
        return [r["method"], level, "", "", "", "", "", "", "", r.get("note", "")]
    ms = f"{r['median_s'] * 1e3:.3f}" if r.get("median_s") is not None else "-"
    sp = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-"
    note = r.get("note", "")
    if r.get("noisy"):
        note = "noisy; " + note
    return [
        r["method"],
        level,
        _si(r["nnz_flops"]),
        f"{r['flops_removed']:.1%}",
        _si(r["params"]),
        f"{r['acc_before']:.2%}",
        f"{r['acc_after']:.2%}",
        ms,
        sp,
        note,
    ]


@dataclass
class AccuracyReport:
    """``rows``: dicts with method, level, kind (dense / structured / unstructured / pipeline), params, flops
    (count_flops per sample), nnz_flops (nonzero-weight FLOPs), flops_removed (of nnz_flops vs dense),
    acc_before / acc_after (validation accuracy right after pruning / after fine-tuning), median_s, p10_s,
    p90_s, speedup (vs dense, median of same-round ratios), noisy, times_s, note; n/a rows carry only a note."""

    rows: list[dict]
    environment: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def header(self) -> str:
        e, s = self.environment, self.settings
        return (
            f"{s.get('model')} on {s.get('task')} ({s.get('train_samples')} train / {s.get('val_samples')} "
            f"val), dense {s.get('dense_epochs')} ep, fine-tune {s.get('finetune_epochs')} ep"
            f"{' with distillation' if s.get('distill') else ''}"
            f"{', iterative x' + str(s.get('iterative')) if s.get('iterative', 1) > 1 else ''}; timed on "
            f"{e.get('cpu')}, {e.get('threads')} thread(s), batch {s.get('time_batch')}, torch {e.get('torch')}, "
            f"commit {e.get('git_commit')}"
        )

    def ranking(self) -> dict[str, list[tuple[str, float]]]:
        """Per level: structured methods by accuracy after fine-tuning, best first (stable for ties)."""
        out: dict[str, list[tuple[str, float]]] = {}
        for r in self.rows:
            if r.get("kind") == "structured" and "acc_after" in r:
                out.setdefault(f"{r['level']:g}", []).append((r["method"], r["acc_after"]))
        return {k: sorted(v, key=lambda t: -t[1]) for k, v in out.items()}

    def markdown(self) -> str:
        lines = [
            f"**{self.header()}**",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join("---" if i in (0, 9) else "---:" for i in range(len(COLUMNS))) + "|",
        ]
        for r in self.rows:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |")
        lines += [
            "",
            (
                "FLOPs: per sample, nonzero weights only (unstructured zeros do not count; int8 rows: the "
                "float model's). acc before / after: validation accuracy right after pruning / after "
                "fine-tuning. ms: median latency of one batch; speedup: median over interleaved rounds of "
                "time(dense) / time(row), measured in this run; noisy: (p90-p10)/median > 0.2."
            ),
            "",
        ]
        for lv, ranked in self.ranking().items():
            lines.append(f"Structured ranking at level {lv}: " + ", ".join(f"{m} {a:.2%}" for m, a in ranked))
        lines.append("")
        lines.append(f"Run took {self.settings.get('wall_s', 0):.0f} s.")
        return "\n".join(lines)

    def print(self) -> None:
        """Rich table on a terminal (plain width-200 rendering when piped)."""
        from rich.console import Console
        from rich.table import Table

        t = Table(
            title=self.header(),
            caption="FLOPs per sample, nonzero weights only; speedup measured vs dense "
            "in this run (median of same-round ratios)",
        )
        for i, c in enumerate(COLUMNS):
            t.add_column(c, justify="left" if i in (0, 9) else "right", no_wrap=i != 9)
        for r in self.rows:
            t.add_row(*_cells(r))
        Console(width=None if sys.stdout.isatty() else 200).print(t)
        for lv, ranked in self.ranking().items():
            print(f"structured ranking at level {lv}: " + ", ".join(f"{m} {a:.2%}" for m, a in ranked))

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "environment": self.environment,
            "rows": self.rows,
            "ranking": self.ranking(),
        }

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def to_csv(self, path: str | os.PathLike) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)

    def pareto(self) -> list[dict]:
        """Timed rows not dominated in (accuracy after fine-tuning, measured speedup), by speedup."""
        pts = [r for r in self.rows if r.get("speedup") is not None]
        front = [
            r
            for r in pts
            if not any(
                (o["acc_after"] >= r["acc_after"] and o["speedup"] >= r["speedup"])
                and (o["acc_after"] > r["acc_after"] or o["speedup"] > r["speedup"])
                for o in pts
            )
        ]
        return sorted(front, key=lambda r: r["speedup"])

    def plot(self, path: str | os.PathLike) -> None:
        """PNG scatter of accuracy after fine-tuning vs measured speedup, the Pareto front joined."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colors = {
            "dense": "black",
            "structured": "tab:blue",
            "unstructured": "tab:orange",
            "pipeline": "tab:green",
        }
        fig, ax = plt.subplots(figsize=(7.5, 5), dpi=90)
        for r in self.rows:
            if r.get("speedup") is None:
                continue
            ax.scatter(
                r["speedup"],
                100 * r["acc_after"],
                color=colors.get(r["kind"], "gray"),
                s=22,
                marker="o" if r.get("level") in (None, 0.5) else "s",
            )
            label = r["method"] if r.get("level") is None else f"{r['method']}@{r['level']:g}"
            ax.annotate(
                label,
                (r["speedup"], 100 * r["acc_after"]),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
        front = self.pareto()
        ax.plot(
            [r["speedup"] for r in front], [100 * r["acc_after"] for r in front], "--", color="gray", lw=0.8
        )
        for kind, c in colors.items():
            ax.scatter([], [], color=c, label=kind)
        ax.legend(fontsize=7, loc="lower left")
        ax.set_xlabel("measured speedup vs dense (same run)")
        ax.set_ylabel("validation accuracy after fine-tuning (%)")
        ax.set_title(
            f"{self.settings.get('model')} on {self.settings.get('task')}: accuracy vs measured speedup",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    def write(self, out_dir: str | os.PathLike, stem: str) -> list[str]:
        """Write ``stem``.md / .json / .csv / .png into ``out_dir``; returns the paths."""
        os.makedirs(out_dir, exist_ok=True)
        paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("md", "json", "csv", "png")]
        with open(paths[0], "w") as f:
            f.write(self.markdown() + "\n")
        self.to_json(paths[1])
        self.to_csv(paths[2])
        self.plot(paths[3])
        return paths
