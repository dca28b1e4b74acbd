"""prune_channels on the zoo: every criterion, several ratios, exact sizes, state_dict round trips."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune
from pyprune import models
from pyprune.pruning import IMPORTANCE, build_graph
from pyprune.pruning.channel import _unfold
from pyprune.pruning.graph import slice_model

# Small inputs keep the matrix affordable on 2 cores.
FULL_MATRIX = ["lenet5", "resnet18", "mobilenet_v2", "bert_small"]
ZOO = {
    "lenet5": (lambda: models.lenet5(num_classes=4), lambda: torch.randn(2, 1, 32, 32), 4),
    "resnet18": (lambda: models.resnet18(num_classes=4), lambda: torch.randn(2, 3, 32, 32), 4),
    "mobilenet_v2": (lambda: models.mobilenet_v2(num_classes=4), lambda: torch.randn(2, 3, 32, 32), 4),
    "bert_small": (lambda: models.bert("small", vocab_size=64), lambda: torch.randint(0, 64, (2, 8)), None),
    "vit_small": (lambda: models.vit_small(num_classes=4, img_size=32), lambda: torch.randn(2, 3, 32, 32), 4),
}


def _data(x, num_classes):
    torch.manual_seed(1)
    if num_classes is None:
        return [x, x.flip(0)], (lambda out: out.pow(2).mean())
    return [(x, torch.randint(0, num_classes, (x.shape[0],))) for _ in range(2)], F.cross_entropy


def _expected_sizes(model, graph, plan):
    """Size every member tensor must have along each pruned dim."""
    cut = {}
    for g, gp in zip(graph.groups, plan.groups):
        assert (g.index, g.channels) == (gp.index, gp.channels)
        for m in g.members:
            key = (m.module, m.tensor, m.dim)
            cut[key] = cut.get(key, 0) + len(gp.removed) * m.inner * m.blocks
    sizes = {}
    for (mod, t, dim), n in cut.items():
        tensor = getattr(model.get_submodule(mod) if mod else model, t)
        sizes[(mod, t, dim)] = tensor.shape[dim] - n
    return sizes


def _roundtrip(pruned, args):
    fresh = copy.deepcopy(pruned)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    buf = io.BytesIO()
    torch.save(pruned.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(*args), pruned.eval()(*args))


def _check(name, importance, ratio, **kw):
    build, make_x, ncls = ZOO[name]
    torch.manual_seed(0)
    model = build().eval()
    x = make_x()
    data, loss_fn = _data(x, ncls)
    kwargs = dict(ratio=ratio, importance=importance, data=data, loss_fn=loss_fn, **kw)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, plan = pyprune.prune_channels(model, x, return_plan=True, **kwargs)
    graph = build_graph(model, (x,))
    for k, v in model.state_dict().items():  # original untouched
        assert torch.equal(v, before_sd[k]), k
    with torch.no_grad():
        assert pruned.eval()(x).shape == model(x).shape
    for (mod, t, dim), size in _expected_sizes(model, graph, plan).items():
        got = getattr(pruned.get_submodule(mod) if mod else pruned, t).shape[dim]
        assert got == size, (mod, t, dim)
    for g in plan.groups:
        if not g.pinned:
            assert g.keep == g.channels - int(ratio * g.channels) or kw.get("round_to", 1) > 1
    p0, p1 = pyprune.count_params(model), pyprune.count_params(pruned)
    f0, f1 = pyprune.count_flops(model, x), pyprune.count_flops(pruned, x)
    assert p1 < p0 and f1 < f0
    _roundtrip(pruned, (x,))
    return model, pruned, plan, (p0, p1, f0, f1)


@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("name", FULL_MATRIX)
def test_zoo_every_criterion(name, importance):
    _check(name, importance, 0.5)


@pytest.mark.parametrize("ratio", [0.25, 0.75])
@pytest.mark.parametrize("name", FULL_MATRIX)
def test_zoo_other_ratios(name, ratio):
    _check(name, "l1", ratio)


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_vit_small(importance):
    _, pruned, plan, _ = _check("vit_small", importance, 0.5)
    assert pruned.blocks[0].attn.num_heads == 3 and pruned.blocks[0].mlp.fc1.out_features == 768


def test_resnet50_and_vgg16_bn_at_small_resolution():
    for build, x in (
        (models.resnet50, torch.randn(1, 3, 32, 32)),
        (models.vgg16_bn, torch.randn(1, 3, 32, 32)),
    ):
        torch.manual_seed(0)
        model = build(num_classes=4).eval()
        pruned = pyprune.prune_channels(model, x, ratio=0.5, importance="l2")
        assert pruned(x).shape == (1, 4)
        assert pyprune.count_params(pruned) < 0.5 * pyprune.count_params(model)
        _roundtrip(pruned, (x,))


@pytest.mark.slow
def test_bert_base_prunes_heads_and_mlp():
    model = models.bert("base").eval()
    x = torch.randint(0, 1000, (1, 16))
    pruned = pyprune.prune_channels(model, x, ratio=0.5)
    assert pruned(x).shape == (1, 16, 768)
    assert pruned.encoder.layer[0].attention.self.num_attention_heads == 6


def test_conv_with_both_sides_pruned_keeps_one_minus_p_squared():
    torch.manual_seed(0)
    model = models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    for p in (0.25, 0.5):
        pruned = pyprune.prune_channels(model, x, ratio=p, protect_first_last=False)
        for name in ("layer2.0.conv2", "layer3.1.conv1", "layer4.0.conv1"):
            frac = pruned.get_submodule(name).weight.numel() / model.get_submodule(name).weight.numel()
            assert frac == pytest.approx((1 - p) ** 2)


def test_residual_groups_stay_consistent():
    model = models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = pyprune.prune_channels(model, x, ratio=0.5, protect_first_last=False)
    assert pruned.conv1.out_channels == 32  # the stem writes layer1's residual stream
    for stage, width in (("layer1", 32), ("layer2", 64), ("layer3", 128), ("layer4", 256)):
        blocks = pruned.get_submodule(stage)
        outs = {blocks[i].conv2.out_channels for i in range(2)} | {
            blocks[i].bn2.num_features for i in range(2)
        }
        assert outs == {width}
        if blocks[0].downsample is not None:
            assert blocks[0].downsample[0].out_channels == width
    assert pruned.layer2[0].conv1.in_channels == pruned.layer1[1].conv2.out_channels
    assert pruned.fc.in_features == 256


def test_pruning_is_exact_when_removed_channels_are_unused(exactness):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    exactness(models.resnet18(num_classes=4), x, ratio=0.5, protect_first_last=False)
    exactness(models.mobilenet_v2(num_classes=4), x, ratio=0.4, importance="fpgm")
    exactness(models.lenet5(), torch.randn(2, 1, 32, 32), ratio=0.5, importance="l2")


def test_l1_removes_the_smallest_filters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with torch.no_grad():
        for i, s in enumerate([3.0, 0.1, 2.0, 0.2]):
            model[0].weight[i] = s
    pruned = pyprune.prune_channels(model, torch.randn(1, 1, 8, 8), ratio=0.5, protect_first_last=False)
    torch.testing.assert_close(pruned[0].weight[:, 0, 0, 0], torch.tensor([3.0, 2.0]))


def test_bn_scale_uses_batchnorm_gammas():
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, -5.0, 0.2, 3.0]))
    plan = pyprune.prune_channels(
        model,
        torch.randn(1, 1, 4, 4),
        ratio=0.5,
        importance="bn_scale",
        protect_first_last=False,
        dry_run=True,
    )
    assert plan.groups[0].removed == [0, 2]


def test_round_to_per_layer_ignore_and_inplace():
    model = models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = pyprune.prune_channels(model, x, ratio=0.3, round_to=16)
    assert pruned.layer1[0].conv1.out_channels == 48  # 64 - 19 = 45 -> 48
    assert pruned.layer3[0].conv1.out_channels % 16 == 0
    pruned = pyprune.prune_channels(
        model, x, ratio=0.5, per_layer={"layer2.0.conv1": 0.25}, ignore=["layer3.0.conv1"]
    )
    assert pruned.layer2[0].conv1.out_channels == 96 and pruned.layer2[1].conv1.out_channels == 64
    assert pruned.layer3[0].conv1.out_channels == 256 and pruned.layer3[0].conv1.in_channels == 128
    assert model.layer1[0].conv1.out_channels == 64
    same = pyprune.prune_channels(model, x, ratio=0.5, inplace=True)
    assert same is model and model.layer1[0].conv1.out_channels == 32


def test_global_ranking_prunes_layers_unevenly():
    torch.manual_seed(0)
    model = models.lenet5().eval()
    with torch.no_grad():
        model.fc1.weight.mul_(10)  # fc1's neurons look far more important than fc2's
    plan = pyprune.prune_channels(
        model, torch.randn(1, 1, 32, 32), ratio=0.3, global_ranking=True, dry_run=True
    )
    prunable = [g for g in plan.groups if not g.pinned]
    assert sum(len(g.removed) for g in prunable) == int(0.3 * sum(g.channels for g in prunable))
    assert len({round(len(g.removed) / g.channels, 2) for g in prunable}) > 1


def test_dry_run_changes_nothing_and_reports_groups():
    model = models.mobilenet_v2(num_classes=4).eval()
    before = pyprune.count_params(model)
    plan = pyprune.prune_channels(model, torch.randn(1, 3, 32, 32), ratio=0.5, dry_run=True)
    assert pyprune.count_params(model) == before
    assert plan.removed_channels > 0 and len(plan.prunable) > 10
    assert "features.1.conv.0.0" in str(plan)  # the first depthwise conv shares the stem's (pinned) channels


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ratio=1.0), r"ratio must be a number in \[0, 1\)"),
        (dict(ratio=-0.1), r"ratio must be"),
        (dict(ratio="half"), r"ratio must be"),
        (dict(importance="magnitude"), r"importance must be one of"),
        (dict(importance="taylor"), r"importance='taylor' needs data="),
        (dict(importance="thinet"), r"importance='thinet' needs data="),
        (dict(importance="taylor", data=[torch.randn(1, 1, 32, 32)]), r"needs loss_fn="),
        (dict(ignore=["conv9"]), r"ignore: model has no layer named 'conv9'"),
        (dict(per_layer={"fc9": 0.5}), r"per_layer: model has no layer named 'fc9'"),
        (dict(per_layer={"conv2": 1.5}), r"per_layer\['conv2'\] must be"),
        (dict(per_layer={"fc3": 0.5}), r"per_layer\['fc3'\].*can't be pruned"),
        (dict(round_to=0), r"round_to must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pyprune.prune_channels(models.lenet5(), torch.randn(1, 1, 32, 32), **kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pyprune.prune_channels("resnet18", torch.randn(1))
    with pytest.raises(TypeError, match="example_inputs"):
        pyprune.prune_channels(models.lenet5(), [[1, 2]])
    with pytest.raises(TypeError, match="data must yield"):
        pyprune.prune_channels(
            models.lenet5(), torch.randn(1, 1, 32, 32), importance="thinet", data=[{"x": 1}]
        )
    with pytest.raises(TypeError, match="seed must be an int.*got 'a'"):
        pyprune.prune_channels(models.lenet5(), torch.randn(1, 1, 32, 32), importance="random", seed="a")


def test_global_ranking_that_would_empty_a_group_raises():
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    with pytest.raises(ValueError, match="would remove every channel of group.*lower ratio"):
        pyprune.prune_channels(
            model, torch.randn(1, 1, 4, 4), ratio=0.5, global_ranking=True, protect_first_last=False
        )


def test_per_layer_overrides_are_kept_out_of_global_ranking():
    model = models.lenet5().eval()
    plan = pyprune.prune_channels(
        model,
        torch.randn(1, 1, 32, 32),
        ratio=0.3,
        global_ranking=True,
        per_layer={"fc1": 0.25},
        dry_run=True,
    )
    fc1 = next(g for g in plan.groups if "fc1" in g.layers and g.channels == 120)
    assert len(fc1.removed) == 30
    rest = [g for g in plan.groups if not g.pinned and g is not fc1]
    assert sum(len(g.removed) for g in rest) == int(0.3 * sum(g.channels for g in rest))


class SameConvs(nn.Module):
    def __init__(self, padding, kernel_size=3, dilation=1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, kernel_size, padding=padding, dilation=dilation)
        self.c3 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_thinet_reads_string_padding_like_the_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    explicit, same = SameConvs(1), SameConvs("same")
    same.load_state_dict(explicit.state_dict())
    kw = dict(importance="thinet", data=[x, x.flip(0)], protect_first_last=False, dry_run=True)
    assert pyprune.prune_channels(same, x, **kw).groups[0].removed == (
        pyprune.prune_channels(explicit, x, **kw).groups[0].removed
    )
    # Even kernels pad "same" unevenly; the patches ThiNet samples must be those the conv multiplies.
    for padding, k, d in (("same", 4, 1), ("same", 3, 2), ("valid", 3, 1)):
        conv = SameConvs(padding, k, d).c2
        h = torch.randn(2, 8, 7, 7)
        cols = _unfold(h, conv)  # (N, C_in * k * k, L)
        out = (conv.weight.reshape(6, -1) @ cols).reshape(2, 6, *conv(h).shape[2:])
        torch.testing.assert_close(out + conv.bias[:, None, None], conv(h))
    kw = dict(importance="thinet", data=[x], protect_first_last=False)
    pruned = pyprune.prune_channels(SameConvs("same", 4), x, **kw)
    assert pruned.c2.out_channels == 3 and pruned(x).shape == (2, 2, 8, 8)


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


def test_failed_inplace_prune_leaves_the_model_as_it_was(monkeypatch):
    def slice_then_fail(*args):
        slice_model(*args)
        raise RuntimeError("failure after slicing")

    monkeypatch.setattr(pyprune.pruning.channel, "slice_model", slice_then_fail)
    torch.manual_seed(0)
    cases = [(models.resnet18(num_classes=4), torch.randn(1, 3, 32, 32)), (AttnNet(), torch.randn(2, 5, 16))]
    for model, x in cases:
        model.eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        layers = {name: (type(m), repr(m)) for name, m in model.named_modules()}  # repr shows the sizes
        with torch.no_grad():
            before = model(x)
        with pytest.raises(RuntimeError, match="failure after slicing"):
            pyprune.prune_channels(model, x, ratio=0.5, protect_first_last=False, inplace=True)
        assert {name: (type(m), repr(m)) for name, m in model.named_modules()} == layers
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(model(x), before)
