"""Layer pruning: residual blocks are found, removed by importance, and the model still runs."""

import copy

import pytest
import torch
from torch import nn

import pyprune
from pyprune import models
from pyprune.pruning import Skip, residual_blocks


def test_residual_blocks_found_in_the_zoo():
    assert residual_blocks(models.resnet18()) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert len(residual_blocks(models.resnet50())) == 16 - 4  # every block but the 4 with downsample
    assert residual_blocks(models.mobilenet_v2())[:3] == ["features.3", "features.5", "features.6"]
    assert residual_blocks(models.bert("small", vocab_size=16)) == [f"encoder.layer.{i}" for i in range(4)]
    assert len(residual_blocks(models.vit_small(img_size=32))) == 12
    assert residual_blocks(models.vgg16_bn()) == [] and residual_blocks(models.lenet5()) == []


@pytest.mark.parametrize(
    "build, x",
    [
        (lambda: models.resnet18(num_classes=3), torch.randn(1, 3, 32, 32)),
        (lambda: models.mobilenet_v2(num_classes=3), torch.randn(1, 3, 32, 32)),
        (lambda: models.bert("small", vocab_size=16), torch.randint(0, 16, (1, 5))),
        (lambda: models.vit_small(num_classes=3, img_size=32), torch.randn(1, 3, 32, 32)),
    ],
)
@pytest.mark.parametrize("importance", ["residual_norm", "l1", "random"])
def test_prune_layers_keeps_outputs_shaped_and_state_dict_loadable(build, x, importance):
    model = build().eval()
    pruned = pyprune.prune_layers(model, n=2, importance=importance, example_inputs=x)
    assert sum(isinstance(m, Skip) for m in pruned.modules()) == 2
    assert not any(isinstance(m, Skip) for m in model.modules())
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    assert pyprune.count_params(pruned) < pyprune.count_params(model)
    kept = {k for k in pruned.state_dict() if not k.endswith("._extra_state")}  # a marker per removed block
    assert kept < set(model.state_dict())
    assert {k for k in pruned.state_dict() if k not in kept} == {
        f"{n}._extra_state" for n, m in pruned.named_modules() if isinstance(m, Skip)
    }
    fresh = copy.deepcopy(pruned)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned(x))


def test_residual_norm_removes_the_block_that_changes_its_input_least():
    model = models.resnet18(num_classes=3).eval()
    with torch.no_grad():
        model.layer3[1].bn2.weight.zero_()  # residual branch outputs only the BN bias (zero)
        model.layer3[1].bn2.bias.zero_()
    pruned = pyprune.prune_layers(model, n=1, example_inputs=torch.randn(1, 3, 32, 32))
    assert isinstance(pruned.layer3[1], Skip)


def test_ratio_and_bad_arguments():
    model = models.resnet50(num_classes=3)
    pruned = pyprune.prune_layers(model, ratio=0.5, importance="l1")
    assert sum(isinstance(m, Skip) for m in pruned.modules()) == 6
    with pytest.raises(ValueError, match="exactly one of n="):
        pyprune.prune_layers(model)
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 12\]"):
        pyprune.prune_layers(model, n=13, importance="l1")
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        pyprune.prune_layers(model, ratio=1.0)
    with pytest.raises(ValueError, match="needs example_inputs"):
        pyprune.prune_layers(model, n=1)
    with pytest.raises(ValueError, match="importance must be one of"):
        pyprune.prune_layers(model, n=1, importance="taylor")
    with pytest.raises(TypeError, match="seed must be an int"):
        pyprune.prune_layers(model, n=1, importance="random", seed="a")
    with pytest.raises(ValueError, match=r"\[0, 0\]"):
        pyprune.prune_layers(models.lenet5(), n=1, importance="l1")


def test_skip_returns_its_first_argument():
    x = torch.randn(2, 3)
    assert Skip()(x, torch.ones(1), mask=None) is x


def test_torch_transformer_encoder_layers_are_removable():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False).eval()
    # layers.0 stays: TransformerEncoder.forward reads its attributes
    assert residual_blocks(enc) == ["layers.1", "layers.2"]
    x = torch.randn(2, 5, 32)
    pruned = pyprune.prune_layers(enc, n=1, example_inputs=x)
    assert sum(isinstance(m, Skip) for m in pruned.layers) == 1
    with torch.no_grad():
        assert pruned(x).shape == (2, 5, 32)


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class ResGroup(nn.Module):  # a residual group of residual blocks (RCAN / EDSR style)
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(ResBlock(), ResBlock(), nn.Conv2d(8, 8, 3, padding=1))
        with torch.no_grad():
            self.body[2].weight.mul_(1e-3)  # the group's own conv is tiny: the groups rank lowest under l1

    def forward(self, x):
        return x + self.body(x)


class NestedResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.groups = nn.Sequential(ResGroup(), ResGroup())
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(self.groups(self.head(x)))


def _skipped(model):
    return [name for name, m in model.named_modules() if isinstance(m, Skip)]


def test_nested_residual_blocks_are_removed_without_overlap():
    torch.manual_seed(0)
    model, x = NestedResidual().eval(), torch.randn(1, 3, 8, 8)
    assert len(residual_blocks(model)) == 6  # both groups and their four blocks
    assert len(_skipped(pyprune.prune_layers(model, n=1, importance="l1"))) == 1
    assert _skipped(pyprune.prune_layers(model, n=2, importance="l1")) == ["groups.0", "groups.1"]
    for n in (3, 4):  # more than the two groups: blocks inside a group that is kept
        pruned = pyprune.prune_layers(model, n=n, importance="l1")
        skipped = _skipped(pruned)
        assert len(skipped) == n and not any(a.startswith(b + ".") for a in skipped for b in skipped)
        assert pruned(x).shape == (1, 3, 8, 8)
    assert len(_skipped(pyprune.prune_layers(model, ratio=0.5, importance="random"))) == 2
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 4\].*removed together"):
        pyprune.prune_layers(model, n=5, importance="l1")
