import json
import math
import statistics
import subprocess
import sys

import pytest
import torch
from torch import nn

import pyprune
from pyprune.cli import main
from pyprune.compare import METHODS
from pyprune.models import lenet5


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@pytest.fixture(scope="module")
def mlp_report():
    return pyprune.compare(_mlp(), torch.randn(4, 64), levels=(0.5, 0.75), rounds=3, budget_s=1.0, threads=1)


def test_rows_for_every_method_and_level(mlp_report):
    keys = {(r["method"], r["level"]) for r in mlp_report.rows}
    expected = {("dense", None), ("2:4", 0.5)}
    expected |= {(m, lv) for m in ("masked", "channel", "csr", "bsr") for lv in (0.5, 0.75)}
    assert keys == expected
    assert len(mlp_report.rows) == len(expected)


def test_speedup_is_median_of_same_round_ratios(mlp_report):
    dense = next(r for r in mlp_report.rows if r["method"] == "dense")
    assert dense["speedup"] == pytest.approx(1.0)
    for r in mlp_report.rows:
        assert isinstance(r["speedup"], float) and r["speedup"] > 0 and math.isfinite(r["speedup"])
        assert len(r["times_s"]) == len(dense["times_s"]) >= 2
        ratios = [d / t for d, t in zip(dense["times_s"], r["times_s"])]
        assert r["speedup"] == pytest.approx(statistics.median(ratios), rel=1e-12)
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["p10_s"] <= r["median_s"] <= r["p90_s"]
        assert r["noisy"] == ((r["p90_s"] - r["p10_s"]) / r["median_s"] > 0.2)


def test_params_drop_for_csr_and_channel(mlp_report):
    rows = {(r["method"], r["level"]): r for r in mlp_report.rows}
    dense = rows[("dense", None)]
    for lv in (0.5, 0.75):
        assert rows[("csr", lv)]["params"] < dense["params"]
        assert rows[("channel", lv)]["params"] < dense["params"]
        assert rows[("masked", lv)]["params"] == dense["params"]  # the zeros are still stored
        assert rows[("csr", lv)]["flops"] < dense["flops"]
    assert rows[("channel", 0.75)]["params"] < rows[("channel", 0.5)]["params"]


def test_channel_matched_to_parameter_budget(mlp_report):
    for r in mlp_report.rows:
        if r["method"] == "channel" and "not reachable" not in r["note"]:
            assert r["prunable_kept"] == pytest.approx(1 - r["level"], abs=0.05)


def test_table_and_json(mlp_report, tmp_path):
    text = mlp_report.table()
    for m in METHODS:
        assert m in text
    path = tmp_path / "r.json"
    mlp_report.to_json(path)
    data = json.loads(path.read_text())
    assert len(data["rows"]) == len(mlp_report.rows)
    env = data["environment"]
    assert env["threads"] == 1 and env["torch"] == torch.__version__ and env["cpu"]
    assert "isa" in env and "git_commit" in env


def test_threads_restored():
    before = torch.get_num_threads()
    pyprune.compare(
        _mlp(), torch.randn(2, 64), methods=("dense",), levels=(0.5,), rounds=2, budget_s=0.1, threads=1
    )
    assert torch.get_num_threads() == before


def test_lenet_conv_model():
    rep = pyprune.compare(
        lenet5(),
        torch.randn(1, 1, 32, 32),
        methods=("dense", "masked", "channel", "csr"),
        levels=(0.5,),
        rounds=2,
        budget_s=0.5,
        threads=1,
    )
    rows = {(r["method"], r["level"]): r for r in rep.rows}
    assert set(rows) == {("dense", None), ("masked", 0.5), ("channel", 0.5), ("csr", 0.5)}
    assert rows[("csr", 0.5)]["params"] < rows[("dense", None)]["params"]
    assert all(r["speedup"] > 0 for r in rep.rows)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"methods": ("dense", "coo")}, "methods"),
        ({"levels": (0.0,)}, "levels"),
        ({"levels": (1.0,)}, "levels"),
        ({"levels": (1.5,)}, "levels"),
        ({"rounds": 0}, "rounds"),
        ({"device": "cuda"}, "device"),
    ],
)
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        pyprune.compare(_mlp(), torch.randn(2, 64), **kwargs)


def test_cli_unknown_model():
    with pytest.raises(ValueError, match="--model"):
        main(["compare", "--model", "alexnet"])


def test_cli_compare_lenet(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyprune.cli",
            "compare",
            "--model",
            "lenet5",
            "--levels",
            "0.5",
            "--rounds",
            "2",
            "--budget",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["rows"]} == set(METHODS)
    assert "dense" in proc.stdout


def test_cli_info_still_works(capsys):
    assert main(["info"]) == 0
