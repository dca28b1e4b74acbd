import csv
import json
import math
import mmap
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.utils.prune
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
    expected |= {(m, lv) for m in METHODS if m not in ("dense", "2:4") for lv in (0.5, 0.75)}
    assert keys == expected
    assert len(mlp_report.rows) == len(expected)


def test_not_applicable_rows_say_why(mlp_report):
    rows = {(r["method"], r["level"]): r for r in mlp_report.rows}
    for lv in (0.5, 0.75):
        r = rows[("channel-pyprune", lv)]  # an MLP has no convolution for PrunedConv2d
        assert r["median_s"] is None and r["note"].startswith("n/a: ") and "Conv2d" in r["note"]
    timed = [r for r in mlp_report.rows if r["method"] != "channel-pyprune"]
    assert all(r["median_s"] is not None for r in timed)
    assert "n/a" in mlp_report.table()
    # asking for its layers says why it did not run, not that per_layer was off
    with pytest.raises(ValueError, match="'channel-pyprune' level=0.5 did not run: no Conv2d"):
        mlp_report.layer_table("channel-pyprune", 0.5)


def test_speedup_is_median_of_same_round_ratios(mlp_report):
    dense = next(r for r in mlp_report.rows if r["method"] == "dense")
    assert dense["speedup"] == pytest.approx(1.0)
    for r in mlp_report.rows:
        if r["median_s"] is None:
            continue
        assert isinstance(r["speedup"], float) and r["speedup"] > 0 and math.isfinite(r["speedup"])
        assert len(r["times_s"]) == len(dense["times_s"]) >= 2
        ratios = [d / t for d, t in zip(dense["times_s"], r["times_s"])]
        assert r["speedup"] == pytest.approx(statistics.median(ratios), rel=1e-12)
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["p10_s"] <= r["median_s"] <= r["p90_s"]
        assert r["noisy"] == ((r["p90_s"] - r["p10_s"]) / r["median_s"] > 0.2)
        assert r["speedup_p10"] <= r["speedup"] <= r["speedup_p90"]


def test_params_drop_for_csr_and_channel(mlp_report):
    rows = {(r["method"], r["level"]): r for r in mlp_report.rows}
    dense = rows[("dense", None)]
    for lv in (0.5, 0.75):
        assert rows[("csr", lv)]["params"] < dense["params"]
        assert rows[("channel", lv)]["params"] < dense["params"]
        assert rows[("masked", lv)]["params"] == dense["params"]  # the zeros are still stored
        assert rows[("csr", lv)]["flops"] < dense["flops"]
        assert rows[("torch.sparse", lv)]["params"] < dense["params"]
        # useful FLOPs: masked dense executes everything but only the kept weights count
        assert (
            rows[("masked", lv)]["flops"]
            == rows[("csr", lv)]["flops"]
            < rows[("masked", lv)]["flops_executed"]
        )
    assert rows[("channel", 0.75)]["params"] < rows[("channel", 0.5)]["params"]


def test_channel_matched_to_parameter_budget(mlp_report):
    for r in mlp_report.rows:
        if r["method"] == "channel" and "not reachable" not in r["note"]:
            assert r["prunable_kept"] == pytest.approx(1 - r["level"], abs=0.05)


def test_roofline_columns(mlp_report):
    env = mlp_report.environment
    assert env["peak_gflops"] > 0 and env["copy_gbps"] > 0
    for r in mlp_report.rows:
        if r["median_s"] is None:
            continue
        assert r["achieved_gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        assert r["frac_peak"] == pytest.approx(r["achieved_gflops"] / env["peak_gflops"])
        assert r["bound"] in ("compute", "memory")
        assert r["bytes"] >= r["memory_bytes"] > 0
        assert r["bound"] in r["explain"] and r["kernels"]
    rows = {(r["method"], r["level"]): r for r in mlp_report.rows}
    assert "pyprune::csr_linear" in rows[("csr", 0.5)]["kernels"]
    assert "pyprune::bsr_linear" in rows[("bsr", 0.5)]["kernels"]


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
    for key in (
        "isa",
        "cpu_flags",
        "git_commit",
        "triton",
        "gpu",
        "peak_gflops",
        "copy_gbps",
        "loadavg_start",
    ):
        assert key in env


def test_threads_restored():
    before = torch.get_num_threads()
    pyprune.compare(
        _mlp(), torch.randn(2, 64), methods=("dense",), levels=(0.5,), rounds=2, budget_s=0.1, threads=1
    )
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def lenet_report():
    return pyprune.compare(
        lenet5(),
        torch.randn(1, 1, 32, 32),
        methods=("dense", "masked", "channel", "channel-pyprune", "csr", "bsr"),
        levels=(0.5, 0.75),
        rounds=2,
        budget_s=0.5,
        threads=1,
        per_layer=True,
        layer_repeats=2,
    )


def test_lenet_conv_model(lenet_report):
    rows = {(r["method"], r["level"]): r for r in lenet_report.rows}
    expected = {("dense", None)}
    expected |= {
        (m, lv) for m in ("masked", "channel", "channel-pyprune", "csr", "bsr") for lv in (0.5, 0.75)
    }
    assert set(rows) == expected
    assert rows[("csr", 0.5)]["params"] < rows[("dense", None)]["params"]
    assert all(r["speedup"] > 0 for r in lenet_report.rows)
    for lv in (0.5, 0.75):
        pc, ch = rows[("channel-pyprune", lv)], rows[("channel", lv)]
        assert "conv -> PrunedConv2d" in pc["note"]
        assert pc["params"] == ch["params"] and pc["flops"] == ch["flops"]  # same shapes, other kernels
        assert "pyprune::pruned_conv2d" in pc["kernels"]
        kinds = {lay["kind"] for lay in pc["layers"].values()}
        assert "PrunedConv2d" in kinds and "Conv2d" not in kinds
    if hasattr(pyprune.nn, "SparseConv2d"):
        kinds = {lay["kind"] for lay in rows[("csr", 0.5)]["layers"].values()}
        assert "SparseConv2d" in kinds


def test_per_layer_data(lenet_report):
    dense = next(r for r in lenet_report.rows if r["method"] == "dense")
    names = set(dense["layers"])
    assert names == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    for r in lenet_report.rows:
        assert set(r["layers"]) == names
        for lay in r["layers"].values():
            # a BSR layer whose only (ragged) block was dropped does no useful work: 0 FLOPs is right
            assert lay["time_s"] > 0 and lay["flops"] >= 0 and lay["bytes"] > 0
            assert lay["flops"] > 0 or r["method"] == "bsr"
            assert lay["bound"] in ("compute", "memory")
            assert lay["intensity"] == pytest.approx(lay["flops"] / lay["bytes"])
    # per-layer useful FLOPs add up to (at most) the model's: pooling and activations count nothing
    assert sum(lay["flops"] for lay in dense["layers"].values()) == dense["flops"]
    text = lenet_report.layer_table("csr", 0.5)
    assert "break-even" in text and "conv2" in text
    with pytest.raises(ValueError, match="per_layer=True"):
        lenet_report.layer_table("2:4", 0.5)


def test_advice_picks_fastest_form(lenet_report):
    advice = lenet_report.advice()
    assert [a["level"] for a in advice] == [0.5, 0.75]
    by = {(r["method"], r["level"]): r for r in lenet_report.rows}
    for a in advice:
        for name, v in a["layers"].items():
            options = {"dense": by[("dense", None)]["layers"][name]["time_s"]}
            for m in ("csr", "bsr"):
                lay = by[(m, a["level"])]["layers"][name]
                if lay["kind"].split("+")[0] not in ("Linear", "Conv2d"):
                    options[m] = lay["time_s"]
            assert v["best"] == min(options, key=options.get)
            assert v["time_s"] == options[v["best"]]
        best = max((r for r in lenet_report.rows if r["level"] == a["level"]), key=lambda r: r["speedup"])
        assert a["model_best"] == (best["method"] if best["speedup"] > 1 else "dense")
    assert "fastest whole model" in lenet_report.advice_text()


def test_save_writes_everything(lenet_report, tmp_path):
    paths = lenet_report.save(tmp_path)
    names = {os.path.basename(p) for p in paths}
    for n in ("compare_lenet5.txt", "compare_lenet5.json", "compare_lenet5.csv", "compare_lenet5_layers.csv",
              "compare_lenet5_speedup.png", "compare_lenet5_roofline.png", "compare_lenet5_layers_50.png",
              "compare_lenet5_layers_75.png"):  # fmt: skip
        assert n in names
    for p in paths:
        assert os.path.getsize(p) > 0
        if p.endswith(".png"):
            with open(p, "rb") as f:
                assert f.read(4) == b"\x89PNG"
    with open(tmp_path / "compare_lenet5.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(lenet_report.rows)
    assert {r["env_threads"] for r in rows} == {"1"} and all(r["env_peak_gflops"] for r in rows)
    with open(tmp_path / "compare_lenet5_layers.csv") as f:
        layer_rows = list(csv.DictReader(f))
    assert len(layer_rows) == 5 * len(lenet_report.rows)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"methods": ("dense", "coo")}, "methods"),
        ({"levels": (0.0,)}, "levels"),
        ({"levels": (1.0,)}, "levels"),
        ({"levels": (1.5,)}, "levels"),
        ({"rounds": 0}, "rounds"),
        ({"device": "tpu"}, "device"),
        ({"layer_repeats": 0}, "layer_repeats"),
        ({"budget_s": -1.0}, "budget_s"),
    ],
)
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        pyprune.compare(_mlp(), torch.randn(2, 64), **kwargs)


def test_a_dense_model_that_fails_on_the_inputs_is_a_clear_error():
    # every speedup is against dense: this ended in KeyError: 'dense@None' after the timing
    with pytest.raises(ValueError, match="the dense model fails on example_inputs"):
        pyprune.compare(_mlp(), torch.randn(2, 63), methods=("dense", "csr"), levels=(0.5,), rounds=1)


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--threads", "0"],
        ["profile", "--threads", "-2"],
        ["compare", "--rounds", "0"],
        ["compare", "--image", "0"],
        ["compare", "--model", "bert-small", "--seq", "0"],
        ["compare", "--budget", "-1"],
        ["advise", "--budget", "0"],
    ],
)
def test_cli_numbers_must_be_positive(argv, capsys):
    # 0 passed for "unset" (--rounds 0 ran 3 rounds, --image 0 the default size) and --threads 0 crashed in
    # torch.set_num_threads
    with pytest.raises(SystemExit) as exc:
        main([*argv[:1], *(["--model", "lenet5"] if "--model" not in argv else []), *argv[1:]])
    assert exc.value.code == 2 and "must be > 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="device: 'cuda' requested but no CUDA GPU"):
        pyprune.compare(_mlp(), torch.randn(2, 64), device="cuda")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["compare", "--model", "alexnet"], ["--model", "alexnet", "resnet50", "bert-base"]),
        (["compare", "--model", "lenet5", "--methods", "coo"], ["--methods", "coo", "csr", "torch.sparse"]),
        (["compare", "--model", "lenet5", "--device", "tpu"], ["--device", "tpu", "cpu", "cuda"]),
        (["profile", "--model", "lenet5", "--method", "dense"], ["--method"]),
        (["profile", "--model", "lenet5", "--method", "coo"], ["--method:", "coo", "csr"]),
        (["profile", "--model", "lenet5", "--level", "1.5"], ["--level"]),
    ],
)
def test_cli_bad_names_list_the_valid_ones(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err


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
            "--csv",
            str(tmp_path / "out.csv"),
            "--plot",
            str(tmp_path / "png"),
        ]
        + (["--device", "cuda"] if not torch.cuda.is_available() else []),
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["rows"]} == set(METHODS)
    assert data["environment"]["device"] == "cpu"
    assert "dense" in proc.stdout
    assert (tmp_path / "out.csv").read_text().startswith("model,method,level")
    assert (tmp_path / "png" / "compare_lenet5_speedup.png").read_bytes()[:4] == b"\x89PNG"
    if not torch.cuda.is_available():
        assert "no CUDA GPU is available" in proc.stderr and "continuing on the CPU" in proc.stderr


def test_cli_compare_channels_last(tmp_path, capsys):
    # every variant, dense included, runs on the channels_last input; the report says so and its files are
    # named apart from a default run's
    argv = ["compare", "--model", "lenet5", "--channels-last", "--levels", "0.5", "--rounds", "2"]
    argv += ["--budget", "1", "--methods", "dense", "channel-pyprune", "csr", "--no-progress"]
    argv += ["--out", str(tmp_path)]
    assert main(argv) == 0
    assert "channels_last input" in capsys.readouterr().out
    data = json.loads((tmp_path / "compare_lenet5_channels_last.json").read_text())
    assert data["environment"]["memory_format"] == "channels_last"
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "channel-pyprune", "csr"}
    assert all(r["speedup"] > 0 for r in rows.values())
    assert "pyprune::pruned_conv2d" in rows["channel-pyprune"]["kernels"]
    assert not (tmp_path / "compare_lenet5.json").exists()


def test_memory_format_recorded_for_default_inputs(lenet_report, mlp_report):
    assert lenet_report.environment["memory_format"] == "contiguous"
    assert mlp_report.environment["memory_format"] is None  # no image input


def test_pool_hint_points_nchw_runs_at_channels_last():
    from pyprune.compare import _pool_hint

    ran = "aten::max_pool2d_with_indices 46%, pyprune::pruned_conv2d[cpp] 40%, aten::addmm 7%"
    hint = _pool_hint(ran, "contiguous")
    assert "max pool takes 46%" in hint and "--channels-last" in hint and "pyprune.nn.MaxPool2d" in hint
    assert _pool_hint(ran, "channels_last") == ""  # already there
    assert _pool_hint("aten::mkldnn_convolution 80%, aten::max_pool2d_with_indices 7%", "contiguous") == ""
    assert _pool_hint("aten::addmm 90%", None) == ""


def test_rows_count_page_faults_and_say_when_they_are_many(mlp_report):
    from pyprune.compare import _fault_hint
    from pyprune.compare.timing import page_faults

    for r in mlp_report.rows:
        if r["median_s"] is not None:
            assert r["page_faults"] is None or r["page_faults"] >= 0
    # a call that maps fresh memory and touches every page faults on each of them
    size = 64 << 20

    def touch():
        # an anonymous mapping of its own: fresh pages whatever the allocator kept from earlier tests (a
        # bytearray came from malloc, which may hand back pages already resident), and 4 KiB ones
        with mmap.mmap(-1, size) as buf:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):  # (Linux)
                buf.madvise(mmap.MADV_NOHUGEPAGE)
            buf[:: 4096] = b"\x01" * (size // 4096)

    n = page_faults(touch, calls=2)
    assert n is None or n >= size // 4096 // 2
    assert "1500 minor page faults a forward" in _fault_hint(1500.0)
    assert _fault_hint(3.0) == "" and _fault_hint(None) == ""


def test_cli_channels_last_needs_an_image_model(capsys):
    assert main(["compare", "--model", "bert-small", "--channels-last", "--no-progress"]) == 2
    assert "--channels-last applies to image models; bert-small takes token ids" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--model", "lenet5", "--seq", "64"], "--seq applies to bert models; lenet5 takes images"),
        (["advise", "--model", "resnet18", "--seq", "8"], "--seq applies to bert models; resnet18 takes images"),
        (["profile", "--seq", "8", "--image", "32"], "--image applies to image models; bert-small takes token ids"),
        (["compare", "--model", "bert-small", "bert-base", "--image", "32"], "bert-small, bert-base take token ids"),
    ],
)
def test_cli_size_options_need_a_model_that_takes_them(argv, message, capsys):
    # --seq with only image models (and --image with only bert) was silently ignored
    assert main([*argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "lenet5", "bert-small", "--seq", "100000"], "--seq must lie in [1, 512]"),
        (["--model", "bert-small", "lenet5", "--image", "16"], "--model lenet5 fails on its input of shape (1, 1, 16"),
    ],
)
def test_cli_sizes_a_later_model_refuses_fail_before_any_timing(argv, message, capsys):
    # they failed after the models before them had been timed and reported
    assert main(["compare", *argv, "--levels", "0.5", "--rounds", "1", "--no-progress"]) == 2
    out = capsys.readouterr()
    assert message in out.err and "vs dense" not in out.out and out.out == ""


def test_cli_channels_last_applies_to_the_image_models_of_a_mixed_run(tmp_path, monkeypatch):
    # the default models are resnet50 and bert-base: --channels-last ran resnet50 for minutes and then failed on
    # bert; it now applies to the image model only, and the check comes before any timing
    from pyprune.compare import cli

    seen = []
    monkeypatch.setattr(
        cli, "model_and_inputs", lambda name, *a: seen.append((name, a[-1])) or (_ for _ in ()).throw(KeyError)
    )  # stops at the first model built
    with pytest.raises(KeyError):
        main(["compare", "--model", "bert-small", "lenet5", "--channels-last", "--no-progress"])
    assert seen == [("bert-small", False)]


def test_cli_info_still_works(capsys):
    assert main(["info"]) == 0


def _quick(model, x, methods, levels=(0.5,)):
    return pyprune.compare(model, x, methods=methods, levels=levels, rounds=2, budget_s=0.2, threads=1)


def test_model_without_weight_layers_gets_rows_not_a_crash():
    # prunable weights 0 divided the kept fraction: ZeroDivisionError ended the run
    model = nn.Sequential(nn.LayerNorm(16), nn.ReLU())
    rep = _quick(model, torch.randn(2, 16), ("dense", "masked", "channel"))
    rows = {r["method"]: r for r in rep.rows}
    assert rows["dense"]["median_s"] is not None and rows["dense"]["prunable_kept"] is None
    assert rows["channel"]["median_s"] is None and "no Linear / Conv2d weights" in rows["channel"]["note"]
    assert "dense" in rep.table()


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.head = nn.Linear(32, 32)

    def forward(self, x):
        return self.head(self.enc(self.mha(x, x, x, need_weights=False)[0]))


def test_linears_whose_owner_reads_their_weight_stay_dense():
    # MultiheadAttention reads out_proj.weight and TransformerEncoderLayer's fast path linear1/2.weight
    # themselves: SparseLinear / torch.sparse modules there crashed the run (and convert's model at inference).
    # A pyprune sparse weight sends TransformerEncoderLayer to the path that calls linear1 / linear2, so those
    # convert; torch.sparse's baseline module has no such weight and leaves them dense.
    torch.manual_seed(0)
    model, x = _Attention().eval(), torch.randn(2, 6, 32)
    rep = _quick(model, x, ("dense", "masked", "csr", "torch.sparse"))
    rows = {r["method"]: r for r in rep.rows}
    assert all(r["median_s"] is not None for r in rows.values()), rows
    assert "3 linear -> csr" in rows["csr"]["note"]  # enc.linear1, enc.linear2, head
    assert "1 linear -> torch.sparse_csr" in rows["torch.sparse"]["note"]
    # their FLOPs count on the fast path too (it is one fused op FlopCounterMode counts as 0)
    assert rows["dense"]["flops"] >= 2 * 6 * 2 * 32 * (4 * 32 + 64 + 64 + 4 * 32)
    masked = pyprune.sparsify(model, sparsity=0.5)
    conv, report = pyprune.convert(masked, layout="csr", return_report=True)
    assert report.converted == ["enc.linear1", "enc.linear2", "head"]
    assert list(report.left_dense) == ["mha.out_proj", "enc.self_attn.out_proj"]
    assert "reads out_proj.weight itself" in report.left_dense["mha.out_proj"]
    with torch.no_grad():
        torch.testing.assert_close(conv(x), masked(x), rtol=1e-4, atol=1e-5)
        auto, report = pyprune.convert(masked, layout="auto", example_inputs=x, return_report=True)
        torch.testing.assert_close(auto(x), masked(x), rtol=1e-4, atol=1e-5)
    assert "enc.self_attn.out_proj" in report.left_dense and "enc.linear2" in report.layouts


@pytest.mark.parametrize("layout", ["csr", "auto"])
def test_encoder_with_a_dense_first_layer_and_sparse_later_ones_takes_padding_masks(layout):
    # nn.TransformerEncoder checks only its first layer before turning a padded input into a NestedTensor:
    # with layers.0 dense and layers.1 converted, SparseLinear received one and crashed
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()
    x, pad = torch.randn(3, 7, 32), torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    masked = pyprune.sparsify(enc, sparsity=0.5, ignore=["layers.0.linear1", "layers.0.linear2"])
    fast = pyprune.convert(masked, layout=layout, example_inputs=(x,))
    assert isinstance(fast.layers[1].linear1, pyprune.nn.SparseLinear) or layout == "auto"
    with torch.no_grad():
        got, want = fast(x, src_key_padding_mask=pad), masked(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[~pad], want[~pad], rtol=1e-4, atol=1e-5)  # padded rows: torch's own choice


def test_sparse_weight_is_not_a_tensor_to_torch_functions():
    # its __torch_function__ (what sends TransformerEncoderLayer past its fast path) returns NotImplemented
    weight = pyprune.nn.SparseLinear.from_dense(nn.Linear(8, 4), sparsity=0.5).weight
    with pytest.raises(TypeError, match="all __torch_function__ handlers returned NotImplemented"):
        torch.add(weight, 1)


def test_kept_fraction_counts_pyprune_layers_in_both_terms():
    # kept counted PrunedConv2d / SparseLinear weights, prunable ones only nn.Linear / Conv2d: kept 1.11
    conv = pyprune.nn.PrunedConv2d.from_dense(nn.Conv2d(3, 8, 3, padding=1), keep_out=[0, 2, 4, 6])
    lin = pyprune.nn.SparseLinear.from_dense(nn.Linear(4 * 8 * 8, 10), sparsity=0.5)
    model = nn.Sequential(conv, nn.Flatten(), lin, nn.ReLU(), nn.Linear(10, 10))
    rep = _quick(model, torch.randn(1, 3, 8, 8), ("dense",))
    kept = rep.rows[0]["prunable_kept"]
    want = (4 * 3 * 9 + lin.weight.nnz + 100) / (4 * 3 * 9 + 256 * 10 + 100)
    assert kept == pytest.approx(want, rel=0.02) and kept <= 1


def test_torch_prune_masks_get_a_clear_error():
    # their computed weight made copy.deepcopy fail with torch's "graph leaves" message
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"torch.nn.utils.prune.remove\(layer, 'weight'\)"):
        _quick(model, torch.randn(2, 8), ("dense",))


def test_plots_skip_variants_without_useful_flops(tmp_path):
    # bsr at 0.9 drops every 32x32 block of 64x64 layers: intensity 0 divided the roofline plot's range
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    rep = _quick(model, torch.randn(4, 64), ("dense", "bsr"), levels=(0.9,))
    assert [r["flops"] for r in rep.rows if r["method"] == "bsr"] == [0]
    paths = rep.save(tmp_path)
    assert any(p.endswith("_roofline.png") for p in paths)
