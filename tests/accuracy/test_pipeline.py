import copy
import importlib

import pytest
import torch
from torch import nn

import pyprune
from pyprune.accuracy import (
    FineTune,
    Int8,
    LowRank,
    NotApplicable,
    Prune,
    SmallResNet,
    effective_flops,
    evaluate,
    parse_stages,
)
from pyprune.accuracy.pipeline import _nnz, apply_prune, bake_masks, match_flops_ratio
from pyprune.pruning import sparsify

# the package re-exports the function pipeline(), which shadows the submodule of the same name
pipeline_mod = importlib.import_module("pyprune.accuracy.pipeline")


@pytest.mark.parametrize(
    "stages, match",
    [
        (["int8", "prune"], "after int8 makes no sense"),
        (["prune", "int8", "finetune"], "after int8"),
        ([], "empty"),
        (["prune", "quantise"], "unknown stage"),
        (["lowrank", "prune"], "prune before lowrank"),
        ([Prune("magnitude", 0.5), "lowrank"], "fill the pruned zeros back in"),
        ([Prune("l1", 1.0)], r"level must be in \(0, 1\)"),
        ([Prune("l1", 0.0)], "level must be"),
        ([Prune("2:4", 0.75)], "fixed sparsity of 0.5"),
        ([Prune("nope", 0.5)], "method must be one of"),
        ([FineTune(-1)], "epochs"),
    ],
)
def test_stage_order_and_arguments_are_checked(stages, match):
    with pytest.raises(ValueError, match=match):
        parse_stages(stages)


def test_parse_stage_names():
    s = parse_stages(["prune", "distill", "lowrank", "finetune", "int8"])
    assert [type(x) for x in s] == [Prune, FineTune, LowRank, FineTune, Int8] and s[1].distill
    with pytest.raises(TypeError, match="list of stages"):
        parse_stages("prune")


def test_level_that_removes_every_channel_is_rejected(trained_lenet):
    x = torch.zeros(1, 1, 32, 32)
    with pytest.raises(ValueError, match="would remove every channel"):
        match_flops_ratio(trained_lenet, (x,), 0.9999, protect_first_last=False)
    ratio, removed = match_flops_ratio(trained_lenet, (x,), 0.5, protect_first_last=False)
    assert 0.5 <= removed < 0.6 and 0 < ratio < 1
    assert removed == pytest.approx(
        1
        - pyprune.count_flops(
            pyprune.prune_channels(trained_lenet, x, ratio=ratio, protect_first_last=False), x
        )
        / pyprune.count_flops(trained_lenet, x)
    )


def test_pipeline_prune_finetune_int8(trained_lenet, small_task):
    train, val = small_task
    res = pyprune.pipeline(
        trained_lenet, train, val, [Prune("taylor", 0.5), FineTune(1), "lowrank", Int8()], measure=False
    )
    assert [r["stage"] for r in res.rows] == [
        "input",
        "prune(taylor@0.5)",
        "finetune(1)",
        "lowrank(tucker, 0.9)",
        "int8",
    ]
    dense = res.rows[0]
    assert dense["accuracy"] == pytest.approx(evaluate(trained_lenet, val))
    assert res.rows[1]["flops"] <= 0.5 * dense["flops"] and res.rows[1]["params"] < dense["params"]
    assert res.rows[3]["params"] < res.rows[2]["params"]
    assert res.rows[2]["accuracy"] > 0.6 and res.rows[4]["accuracy"] > 0.6
    assert "int8 static" in res.rows[4]["note"]
    assert isinstance(trained_lenet.fc1, nn.Linear)  # the input model is untouched


def test_unstructured_zeros_survive_finetuning(trained_lenet, small_task):
    res = pyprune.pipeline(trained_lenet, *small_task, [Prune("csr", 0.6), FineTune(1)], measure=False)
    out = res.model
    assert isinstance(out.fc1, pyprune.nn.SparseLinear)
    assert _nnz(out.fc1.weight) == pytest.approx(0.4 * 120 * 400, abs=2)
    assert res.rows[-1]["nnz_flops"] == pytest.approx(0.4 * res.rows[0]["nnz_flops"], rel=0.01)
    res = pyprune.pipeline(trained_lenet, *small_task, [Prune("magnitude", 0.6), FineTune(1)], measure=False)
    conv = res.model.conv2.weight.detach()
    assert isinstance(res.model.conv2, nn.Conv2d) and float((conv == 0).float().mean()) == pytest.approx(
        0.6, abs=0.01
    )
    assert res.rows[-1]["flops"] == res.rows[0]["flops"]  # plain dense kernels compute the zeros


def test_iterative_pruning_reaches_the_level(trained_lenet, small_task):
    x = small_task[1].x[:1]
    p = Prune("l1", 0.6, steps=3, between=FineTune(1))
    pruned, note = apply_prune(trained_lenet, p, (x,), small_task[0])
    assert note.startswith("3 steps")
    assert pyprune.count_flops(pruned, x) <= 0.4 * pyprune.count_flops(trained_lenet, x)


def test_not_applicable_methods(trained_lenet, small_task):
    x = small_task[1].x[:1]
    with pytest.raises(NotApplicable, match="BatchNorm"):
        apply_prune(trained_lenet, Prune("slimming", 0.5), (x,), small_task[0])
    with pytest.raises(NotApplicable, match="residual blocks"):
        apply_prune(trained_lenet, Prune("layer", 0.5), (x,), small_task[0])


def test_layer_and_slimming_on_a_resnet():
    torch.manual_seed(0)
    m = SmallResNet(width=4).eval()
    x = torch.randn(1, 1, 16, 16)
    data = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))]
    pruned, note = apply_prune(m, Prune("layer", 0.3), (x,), data)
    assert "blocks removed" in note and any(isinstance(b, pyprune.pruning.Skip) for b in pruned.modules())
    slim, note = apply_prune(m, Prune("slimming", 0.5, slim_epochs=1), (x,), data)
    assert note.startswith("1 ep L1")
    assert pyprune.count_flops(slim, x) <= 0.5 * pyprune.count_flops(m, x)


def test_pipeline_rejects_bad_data(trained_lenet, small_task):
    train, val = small_task
    bad_shape = [(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="train_data: batch 0 has samples of shape"):
        pyprune.pipeline(trained_lenet, bad_shape, val, ["finetune"], measure=False)
    bad_labels = [(torch.zeros(4, 1, 32, 32), torch.tensor([0, 1, 2, 12]))]
    with pytest.raises(ValueError, match="train_data: .*expected \\[0, 9\\]"):
        pyprune.pipeline(trained_lenet, bad_labels, val, ["finetune"], measure=False)
    with pytest.raises(ValueError, match="train_data is empty"):
        pyprune.pipeline(trained_lenet, [], val, ["finetune"], measure=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pyprune.pipeline("lenet", train, val, ["finetune"])


def test_effective_flops_counts_only_nonzero_weights(trained_lenet):
    x = torch.zeros(2, 1, 32, 32)
    assert effective_flops(trained_lenet, x) == pyprune.count_flops(trained_lenet, x)
    masked = sparsify(trained_lenet, 0.5)
    assert effective_flops(masked, x) == pytest.approx(0.5 * pyprune.count_flops(trained_lenet, x), rel=0.01)


def test_effective_flops_skips_norms_and_embeddings_and_reads_a_linear_output_right():
    # BatchNorm, LayerNorm and Embedding hold a weight but do no multiply-adds with it; a Linear on a 4-D
    # input has its features on the last dim (counted on dim 1 before: 10240 instead of 3840)
    conv_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert effective_flops(conv_bn, x) == pyprune.count_flops(conv_bn, x)
    emb = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 8))
    tokens = torch.randint(0, 50, (2, 7))
    assert effective_flops(emb, tokens) == pyprune.count_flops(emb, tokens) == 2 * 14 * 16 * 8
    lin = torch.nn.Linear(16, 8)
    assert effective_flops(lin, torch.randn(1, 3, 5, 16)) == 2 * 15 * 16 * 8


def test_pipeline_and_prune_check_their_sizes(trained_lenet, small_task):
    with pytest.raises(ValueError, match="time_batch must be an int >= 1"):
        pyprune.pipeline(copy.deepcopy(trained_lenet), *small_task, [Prune("l1", 0.5)], time_batch=-5)
    with pytest.raises(ValueError, match="Prune.block must be a \\(bh, bw\\) pair of ints >= 1"):
        pyprune.pipeline(copy.deepcopy(trained_lenet), *small_task, [Prune("block", 0.5, block=(0, 2))])


def test_bake_masks_leaves_the_masked_model_working(trained_lenet):
    x = torch.randn(2, 1, 32, 32)
    masked = sparsify(trained_lenet, 0.5)
    baked = bake_masks(masked)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), masked(x))  # the masked model still has its weight property
    assert not any(n.endswith("original") for n, _ in baked.named_parameters())


def test_reported_speedup_is_measured_not_a_flop_ratio(trained_lenet, small_task, monkeypatch):
    calls = []

    def fake(fns, rounds, threads, budget_s, seed=0, **kw):
        calls.append(list(fns))
        # the pruned model "measures" 1.25x SLOWER although it has half the FLOPs
        return {k: [1.0, 1.1, 0.9] if k == "0" else [1.25, 1.375, 1.125] for k in fns}

    monkeypatch.setattr(pipeline_mod, "time_interleaved", fake)
    res = pyprune.pipeline(trained_lenet, *small_task, [Prune("l1", 0.5)], budget_s=0.1)
    assert calls == [["0", "1"]]
    assert res.rows[1]["flops"] < 0.55 * res.rows[0]["flops"]
    assert res.rows[1]["speedup"] == pytest.approx(0.8) and res.rows[0]["speedup"] == pytest.approx(1.0)
    assert res.rows[1]["median_s"] == pytest.approx(1.25)


def test_pipeline_measures_for_real(trained_lenet, small_task):
    res = pyprune.pipeline(
        copy.deepcopy(trained_lenet), *small_task, [Prune("l1", 0.5)], budget_s=0.3, time_batch=8
    )
    assert all(r["median_s"] > 0 and r["speedup"] > 0 for r in res.rows)
    assert "0 ms" not in res.table() and "prune(l1@0.5)" in res.table()
