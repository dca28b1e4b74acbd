import io

import pytest
import torch
from torch import nn

import pyprune
from pyprune import models
from pyprune.pruning import PrunedMultiheadAttention, Skip, load_pruned_state_dict



class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(h + self.attn(h, h, h, need_weights=False)[0])


def _saved(state_dict):
    """state_dict through torch.save / torch.load (weights_only, torch's default), as a deployment stores it."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same_model(pruned: nn.Module, rebuilt: nn.Module, x) -> None:
    assert repr(rebuilt) == repr(pruned)  # every module's type and sizes (in_channels, num_features, ...)
    with torch.no_grad():
        a, b = pruned(x), rebuilt(x)
    a, b = (a, b) if isinstance(a, torch.Tensor) else (a[0], b[0])
    torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make, x",
    [
        (models.resnet18, torch.randn(1, 3, 32, 32)),
        (models.mobilenet_v2, torch.randn(1, 3, 32, 32)),
        (lambda: models.bert("small"), torch.randint(0, 100, (1, 8))),
        (Attn, torch.randn(2, 5, 12)),
    ],
)
def test_channel_pruned_model_rebuilds_from_its_state_dict(make, x):
    torch.manual_seed(0)
    pruned = pyprune.prune_channels(make().eval(), x, ratio=0.5, protect_first_last=False)
    fresh = make().eval()
    keys = load_pruned_state_dict(fresh, _saved(pruned.state_dict()))
    assert not keys.missing_keys and not keys.unexpected_keys
    _same_model(pruned, fresh, x)
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in make().parameters())


def test_mha_whose_width_changed_becomes_pruned_mha():
    x = torch.randn(2, 5, 12)
    pruned = pyprune.prune_channels(Attn().eval(), x, ratio=0.5, protect_first_last=False)
    fresh = Attn().eval()
    load_pruned_state_dict(fresh, pruned.state_dict())
    assert isinstance(fresh.attn, PrunedMultiheadAttention) and fresh.attn.num_heads == pruned.attn.num_heads


def test_layer_and_channel_pruned_resnet_rebuilds_with_its_skips():
    x = torch.randn(1, 3, 32, 32)
    pruned = pyprune.prune_layers(models.resnet18().eval(), n=2, importance="l1")
    pruned = pyprune.prune_channels(pruned, x, ratio=0.25)
    skipped = [n for n, m in pruned.named_modules() if isinstance(m, Skip)]
    assert len(skipped) == 2
    sd = _saved(pruned.state_dict())
    assert all(f"{n}._extra_state" in sd for n in skipped)
    fresh = models.resnet18().eval()
    load_pruned_state_dict(fresh, sd)
    assert [n for n, m in fresh.named_modules() if isinstance(m, Skip)] == skipped
    _same_model(pruned, fresh, x)


def test_a_pruned_model_still_loads_its_own_state_dict():
    pruned = pyprune.prune_layers(models.resnet18().eval(), n=1, importance="l1")
    pruned.load_state_dict(pruned.state_dict())
    skip = next(m for m in pruned.modules() if isinstance(m, Skip))
    with pytest.raises(ValueError, match="Skip: state_dict entry '_extra_state' must be"):
        skip.set_extra_state({"something": "else"})


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.mid(self.emb(ids)))


def test_tied_weights_stay_tied():
    sd = Tied().state_dict()
    sd = {**sd, "emb.weight": sd["emb.weight"][:, :6], "out.weight": sd["emb.weight"][:, :6],
          "mid.weight": sd["mid.weight"][:6, :6], "mid.bias": sd["mid.bias"][:6]}  # fmt: skip
    fresh = Tied()
    load_pruned_state_dict(fresh, sd)
    assert fresh.out.weight is fresh.emb.weight and fresh.emb.embedding_dim == 6 and fresh.mid.in_features == 6
    assert fresh(torch.tensor([[1, 2]])).shape == (1, 2, 10)


def _unchanged(model, before):
    after = {k: v for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    for k in before:
        assert after[k] is not None and torch.equal(after[k], before[k]), k


def test_a_grown_dimension_is_refused_and_the_model_kept():
    model = models.resnet18().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(model.state_dict())
    sd["conv1.weight"] = torch.zeros(65, 3, 7, 7)
    with pytest.raises(ValueError, match=r"state_dict\['conv1.weight'\] has shape \(65, 3, 7, 7\), but the model"):
        load_pruned_state_dict(model, sd)
    _unchanged(model, before)
    assert model.conv1.out_channels == 64


def test_keys_of_another_model_are_refused_before_any_copy():
    # a shrunk tensor is fine, an unknown key is not: the model keeps its weights and sizes
    model = models.resnet18().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(model.state_dict())
    sd["conv1.weight"] = torch.ones(32, 3, 7, 7)
    sd["head.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"unexpected keys \['head.weight'\]"):
        load_pruned_state_dict(model, sd)
    _unchanged(model, before)
    assert model.conv1.out_channels == 64 and model.conv1.weight.shape[0] == 64


def test_strict_false_returns_the_missing_keys():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    keys = load_pruned_state_dict(model, {"0.weight": torch.ones(5, 4), "0.bias": torch.ones(5)}, strict=False)
    assert keys.missing_keys == ["2.weight", "2.bias"] and model[0].out_features == 5


def test_masked_state_dict_gets_a_hint():
    masked = pyprune.sparsify(nn.Sequential(nn.Linear(4, 8)), sparsity=0.5)
    with pytest.raises(ValueError, match="remove_masks"):
        load_pruned_state_dict(nn.Sequential(nn.Linear(4, 8)), masked.state_dict())


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        load_pruned_state_dict({}, {})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_pruned_state_dict(nn.Linear(2, 2), [("weight", torch.ones(2, 2))])


def test_a_cut_kernel_is_refused_and_the_model_kept():
    # pruning never cuts a conv's kernel: such a shape loaded and then failed in the forward
    model = models.resnet18().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(model.state_dict())
    sd["layer1.0.conv1.weight"] = torch.zeros(32, 64, 1, 1)
    with pytest.raises(ValueError, match="dimension 2 of a Conv2d's weight is never pruned"):
        load_pruned_state_dict(model, sd)
    _unchanged(model, before)


@pytest.mark.parametrize(
    "bad, message", [(torch.empty(4, 8, device="meta"), "on the meta device"), (3, "not a tensor")]
)
def test_values_torch_cannot_copy_are_refused_before_any_copy(bad, message):
    # torch's load_state_dict copies the tensors it can before it fails on such an entry
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    sd["0.weight"] = bad
    with pytest.raises(ValueError, match=message):
        load_pruned_state_dict(model, sd)
    _unchanged(model, before)
