import pytest
import torch
from torch import nn

import pyprune
from pyprune.compare import auto


def _masked_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    return pyprune.sparsify(mlp, 0.75, pattern="unstructured")


def test_auto_converts_every_masked_layer_and_keeps_outputs(monkeypatch):
    auto.clear_cache()
    calls = []
    real = auto._measure
    monkeypatch.setattr(auto, "_measure", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    model = _masked_mlp()
    x = torch.randn(4, 64)
    out, rep = pyprune.convert(model, layout="auto", example_inputs=(x,), return_report=True)
    assert set(rep.layouts) == {"0", "2", "4"}
    assert set(rep.layouts.values()) <= {"dense", "csr", "bsr", "2:4"}
    assert "2:4" not in rep.layouts.values()  # a 75% unstructured mask is not 2:4
    for name, layout in rep.layouts.items():
        mod = out.get_submodule(name)
        if layout == "dense":
            assert type(mod) is nn.Linear and name in rep.left_dense
        else:
            assert isinstance(mod, pyprune.nn.SparseLinear) and mod.layout == layout and name in rep.converted
        assert pyprune.pruning.get_mask(mod) is None
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    # layers 0 and 2 share shape, input shape and pattern statistics: measured once
    assert len(calls) == 2
    before = len(calls)
    pyprune.convert(model, layout="auto", example_inputs=x)
    assert len(calls) == before  # every decision came from the cache


def test_auto_offers_24_only_for_24_masks():
    auto.clear_cache()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32)).eval()
    masked = pyprune.sparsify(mlp, 0.5, pattern="2:4")
    x = torch.randn(8, 64)
    plan = auto.plan(masked, x)
    layout, times = plan["0"]
    assert set(times) == {"dense", "csr", "bsr", "2:4"}
    assert layout == min(times, key=times.get)


def test_convs_of_one_shape_but_another_geometry_are_measured_apart(monkeypatch):
    # the timing cache's key left out stride, padding, dilation, groups and padding_mode: a reflect-padded
    # conv took a zero-padded one's "csr", which SparseConv2d can't hold (convert raised)
    auto.clear_cache()
    calls = []
    real = auto._measure
    monkeypatch.setattr(auto, "_measure", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    torch.manual_seed(0)
    convs = [nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")]
    convs.append(nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    for c in convs[1:]:
        c.weight.data.copy_(convs[0].weight.data)  # the same pattern statistics
    model = pyprune.sparsify(nn.Sequential(*convs).eval(), 0.9)
    x = torch.randn(1, 8, 10, 10)
    out, rep = pyprune.convert(model, layout="auto", example_inputs=x, return_report=True)
    assert len(calls) == 3
    assert type(out.get_submodule("1")) is nn.Conv2d  # reflect padding stays dense, whatever the timings
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_auto_bad_input():
    with pytest.raises(ValueError, match="example_inputs"):
        pyprune.convert(_masked_mlp(), layout="auto")
    with pytest.raises(ValueError, match="candidates"):
        auto.plan(_masked_mlp(), torch.randn(2, 64), candidates=("coo",))
    with pytest.raises(ValueError, match="auto"):
        pyprune.convert(_masked_mlp(), layout="ell")


def test_train_times_forward_and_backward_and_is_cached_apart(monkeypatch):
    # train=True: each candidate runs a forward and a backward to x and to its parameters; its decisions are
    # cached apart from the forward-only ones (the same layers are measured again, once)
    auto.clear_cache()
    calls, stepped = [], {}
    real_measure, real_steps = auto._measure, auto._training_steps
    monkeypatch.setattr(auto, "_measure", lambda *a, **k: calls.append(a[-1]) or real_measure(*a, **k))
    monkeypatch.setattr(auto, "_training_steps", lambda mods, x: stepped.update(mods) or real_steps(mods, x))
    model = _masked_mlp()
    x = torch.randn(4, 64)
    pyprune.convert(model, layout="auto", example_inputs=x)
    assert calls == [False, False] and not stepped
    out, rep = pyprune.convert(model, layout="auto", example_inputs=x, return_report=True, train=True)
    assert calls == [False, False, True, True]
    assert set(stepped) >= {"dense", "csr", "bsr"}
    for m in stepped.values():  # the timed steps left their gradients on every parameter
        assert all(p.grad is not None for p in m.parameters())
    pyprune.convert(model, layout="auto", example_inputs=x, train=True)
    assert len(calls) == 4  # cached
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    # the converted model trains: its sparse layers get gradients
    out.train()
    out(x).square().sum().backward()
    assert all(p.grad is not None for p in out.parameters() if p.requires_grad)


def test_train_bad_input():
    with pytest.raises(ValueError, match="train=True applies to layout='auto'"):
        pyprune.convert(_masked_mlp(), layout="csr", train=True)
    with pytest.raises(TypeError, match="train must be a bool"):
        pyprune.convert(_masked_mlp(), layout="auto", example_inputs=torch.randn(2, 64), train="yes")
