import importlib
import json

import pytest

from pyprune.accuracy import accuracy_study
from pyprune.cli import main

# the package re-exports the function pipeline(), which shadows the submodule of the same name
pipeline_mod = importlib.import_module("pyprune.accuracy.pipeline")


def test_study_rows_report_and_measured_speedups(tmp_path, monkeypatch):
    seen = {}

    def fake(fns, rounds, threads, budget_s, seed=0, **kw):
        seen.update(fns)  # dense 2 s, every other model 4 s: speedup 0.5 whatever the FLOPs say
        return {k: [2.0, 2.0, 2.0] if k == "dense" else [4.0, 4.0, 4.0] for k in fns}

    monkeypatch.setattr(pipeline_mod, "time_interleaved", fake)
    rep = accuracy_study(
        methods=["l1", "layer", "magnitude"], levels=[0.5], epochs=1, finetune_epochs=1, verbose=False
    )
    by = {(r["method"], r["level"]): r for r in rep.rows}
    assert set(seen) == {
        "dense",
        "l1@0.5",
        "magnitude@0.5",
        "dense+int8",
        "l1@0.5+lowrank",
        "l1@0.5+lowrank+int8",
    }
    assert by[("layer", 0.5)]["note"].startswith("n/a") and "speedup" not in by[("layer", 0.5)]
    l1 = by[("l1", 0.5)]
    assert l1["flops_removed"] >= 0.5 and l1["speedup"] == pytest.approx(0.5)
    assert 0.1 < l1["acc_before"] <= 1 and 0.1 < l1["acc_after"] <= 1
    assert rep.ranking() == {"0.5": [("l1", l1["acc_after"])]}
    paths = rep.write(tmp_path, "acc")
    data = json.loads((tmp_path / "acc.json").read_text())
    assert len(data["rows"]) == len(rep.rows) and data["settings"]["dense_epochs"] == 1
    assert "| l1 | 0.5 |" in (tmp_path / "acc.md").read_text()
    assert (tmp_path / "acc.csv").read_text().count("\n") == len(rep.rows) + 1
    assert (tmp_path / "acc.png").stat().st_size > 1000 and len(paths) == 4


def test_study_bad_arguments():
    with pytest.raises(ValueError, match="levels must be in"):
        accuracy_study(levels=[1.0], verbose=False)
    with pytest.raises(ValueError, match="methods: unknown"):
        accuracy_study(methods=["l1", "l7"], verbose=False)
    with pytest.raises(ValueError, match="model must be one of"):
        accuracy_study(model="vgg", verbose=False)


@pytest.mark.parametrize(
    "argv, word",
    [
        (["--levels", "1.5"], "levels"),
        (["--model", "foo"], "model"),
        (["--batch", "0"], "--batch"),
        (["--threads", "0"], "--threads"),
        (["--epochs", "-1"], "--epochs"),
        (["--budget", "-1"], "--budget"),
    ],
)
def test_cli_accuracy_bad_arguments_are_clear_errors(argv, word, capsys):
    # a traceback (or a ZeroDivisionError for --batch 0) before; now as compare's CLI: exit status 2
    try:
        rc = main(["accuracy", *argv])
    except SystemExit as exc:  # argparse's own checks
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "pyprune accuracy: error:" in err and word in err


def test_study_without_dense_training_epochs(capsys):
    # epochs=0 is allowed (train() takes >= 0); its log line read the first and last loss of an empty list
    rep = accuracy_study(methods=["l1"], levels=[0.5], epochs=0, finetune_epochs=0, run_pipeline=False,
                         budget_s=0.2, time_batch=8, verbose=True)  # fmt: skip
    assert "(untrained, " in capsys.readouterr().out
    assert len(rep.rows) >= 2


def test_cli_accuracy_runs(tmp_path, capsys):
    rc = main(
        [
            "accuracy",
            "--methods",
            "l1",
            "--levels",
            "0.5",
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--no-pipeline",
            "--budget",
            "0.3",
            "--batch",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "structured ranking at level 0.5: l1" in out
    assert (tmp_path / "accuracy_lenet5.json").exists()
