"""The GPU device suite is wired up: its --dry mode runs on the CPU and writes a table marked DRY."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_suite_dry_run_writes_results(tmp_path):
    out = tmp_path / "suite"
    proc = _run_dry(out, timeout=300)
    md, js = out / "results.md", out / "results.json"
    assert md.is_file() and js.is_file(), proc.stdout
    assert "DRY" in md.read_text()
    data = json.loads(js.read_text())
    assert data["dry"] is True and len(data["cases"]) > 0
    assert all("ours_ms" not in c for c in data["cases"])  # no timings in a dry run
    assert {c["M"] for c in data["skew"]} == {16, 128, 2048}  # the schedule cases are planned
    assert all(not any(k.endswith("_ms") for k in c) for c in data["skew"])
    conv = json.loads((out / "pruned_conv2d.json").read_text())
    assert conv["dry"] is True and len(conv["cases"]) > 0
    assert all(not any(k.endswith("_ms") for k in c) for c in conv["cases"])
    assert "DRY" in (out / "pruned_conv2d.md").read_text()
    bsrconv = json.loads((out / "bsr_conv2d.json").read_text())
    assert bsrconv["dry"] is True and len(bsrconv["cases"]) > 0
    assert all(not any(k.endswith("_ms") for k in c) for c in bsrconv["cases"])
    assert "DRY" in (out / "bsr_conv2d.md").read_text()
    csr = json.loads((out / "csr_sparse24.json").read_text())
    assert csr["dry"] is True and len(csr["csr"]) > 0 and len(csr["semi_structured"]) > 0
    assert all(not any(k.endswith("_ms") for k in c) for c in csr["csr"] + csr["semi_structured"])
    assert "DRY" in (out / "csr_sparse24.md").read_text()
    # the training-step table runs its --quick CPU form: real timings of three tiny convs
    train = json.loads((out / "sparse_conv2d_train_gpu.json").read_text())
    assert len(train["rows"]) == 3 and all(r["median_s"]["dense"] > 0 for r in train["rows"])
    steps = (out / "steps.tsv").read_text()
    for name in ("bench", "bench_conv", "bench_bsrconv", "bench_csr", "bench_convtrain"):
        assert f"{name}\t0" in steps, steps
    assert "DRY" in proc.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_suite_deadline_cuts_the_steps_it_reaches(tmp_path):
    # SUITE_TOTAL_S is the whole run's deadline: steps that start with under 5 s left are skipped and said so
    out = tmp_path / "suite"
    proc = _run_dry(out, timeout=120, SUITE_TOTAL_S="3")
    rows = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    for name in ("env", "bench", "bench_conv", "bench_bsrconv", "bench_csr", "bench_convtrain"):
        assert rows[name] == "skipped", rows
    assert "no time left before the 3s deadline" in proc.stdout


def _run_dry(out, timeout, **env):
    """suite.sh OUT --dry with this Python, PATH and ``env``; asserts that it exits 0."""
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "suite.sh"), str(out), "--dry"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHON": sys.executable, "PATH": _path(), **env},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _path():
    import os

    return os.environ.get("PATH", "/usr/bin:/bin")


def test_run_budgeted_records_failures_and_skips_past_the_budget(monkeypatch):
    # the benches' case loop (bench_bsr_linear_gpu.run_budgeted), without a GPU
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_bsr_linear_gpu as b

    now = [0.0]
    monkeypatch.setattr(b.time, "time", lambda: now[0])
    saved = []

    def run_one(c):  # each case takes 4 s
        now[0] += 4.0
        if c["i"] == 1:
            raise RuntimeError("boom")
        return dict(c, ok=True)

    cases = [{"i": i} for i in range(4)]
    rows, skipped = b.run_budgeted(cases, 10.0, run_one, lambda r: saved.append(len(r)), save_every=2)
    assert rows[0] == {"i": 0, "ok": True} and "boom" in rows[1]["case_error"]
    assert rows[2] == {"i": 2, "ok": True} and skipped == 1  # the 4th case starts past the 10 s budget
    assert saved == [2]
