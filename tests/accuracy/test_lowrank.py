import importlib

import pytest
import torch
from torch import nn

from pyprune.accuracy import cp_conv, energy_rank, lowrank, svd_linear, tucker2_conv
from pyprune.accuracy.lowrank import cp_als, cp_reconstruct, dense_weight, relative_error

# the package re-exports the function lowrank(), which shadows the submodule of the same name
lowrank_mod = importlib.import_module("pyprune.accuracy.lowrank")


def test_energy_rank_hand_cases():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2  # 13/14 = 0.93
    assert energy_rank(s, 1.0) == 3
    with pytest.raises(ValueError, match="energy"):
        energy_rank(s, 0.0)


def test_svd_error_falls_with_rank_and_matches_eckart_young():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    errs = []
    for r in (2, 8, 16, 24):
        approx = dense_weight(svd_linear(lin, r))
        errs.append(relative_error(lin.weight, approx))
        expected = float(s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert errs[-1] == pytest.approx(expected, abs=1e-5)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-5
    x = torch.randn(5, 40)
    torch.testing.assert_close(svd_linear(lin, 24)(x), lin(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        svd_linear(lin, 25)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_tucker2_error_falls_and_module_computes_its_weight(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, stride=stride, padding=padding, dilation=dilation)
    errs = [
        relative_error(conv.weight, dense_weight(tucker2_conv(conv, r, min(r, 12)))) for r in (2, 6, 12, 20)
    ]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-5
    x = torch.randn(2, 12, 11, 11)
    t = tucker2_conv(conv, 8, 6)
    ref = nn.functional.conv2d(x, dense_weight(t).float(), conv.bias, stride, padding, dilation)
    torch.testing.assert_close(t(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tucker2_conv(conv, 20, 12)(x), conv(x), rtol=1e-4, atol=1e-4)


def test_cp_recovers_a_low_rank_tensor_and_conv_matches():
    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(d, 3, generator=gen, dtype=torch.double) for d in (6, 5, 3, 3)]
    t = cp_reconstruct(factors)
    assert relative_error(t, cp_reconstruct(cp_als(t, 3, iters=300))) < 1e-4
    conv = nn.Conv2d(5, 6, 3, stride=(2, 1), padding=(1, 0), bias=True)
    with torch.no_grad():
        conv.weight.copy_(t.float())
    errs = [relative_error(conv.weight, dense_weight(cp_conv(conv, r))) for r in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3
    x = torch.randn(2, 5, 9, 9)
    torch.testing.assert_close(cp_conv(conv, 3)(x), conv(x), rtol=1e-3, atol=1e-3)


def test_lowrank_model_energy(trained_lenet, small_task):
    x = small_task[1].x[:16]
    m, rep = lowrank(trained_lenet, energy=0.95)
    assert "fc1" in rep.factorised and isinstance(m.fc1, nn.Sequential)
    assert isinstance(trained_lenet.fc1, nn.Linear)  # a copy is factorised
    small, _ = lowrank(trained_lenet, energy=0.6)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        ref = trained_lenet(x)
        err_hi, err_lo = relative_error(ref, m(x)), relative_error(ref, small(x))
    assert err_hi < err_lo and err_hi < 0.3
    assert rep.layers["conv1"]["ranks"] is None  # a 1-channel input conv gains nothing: left alone


def test_lowrank_latency_mode_uses_measured_times(trained_lenet, small_task, monkeypatch):
    x = small_task[1].x[:8]

    def fake(fns, rounds, threads, budget_s, seed=0, **kw):  # every candidate 2x slower than the layer
        return {k: [1.0 if k == "dense" else 2.0] * 3 for k in fns}

    monkeypatch.setattr(lowrank_mod, "time_interleaved", fake)
    _, rep = lowrank(trained_lenet, x, rank_by="latency")
    assert rep.factorised == [] and all(
        "1.05x" in d["note"] or "fewer" in d["note"] for d in rep.layers.values()
    )

    def fast(fns, rounds, threads, budget_s, seed=0, **kw):  # every candidate 2x faster
        return {k: [1.0 if k == "dense" else 0.5] * 3 for k in fns}

    monkeypatch.setattr(lowrank_mod, "time_interleaved", fast)
    _, rep = lowrank(trained_lenet, x, rank_by="latency")
    assert "fc1" in rep.factorised and rep.layers["fc1"]["speedup"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="example_inputs"):
        lowrank(trained_lenet, rank_by="latency")
    with pytest.raises(ValueError, match="method"):
        lowrank(trained_lenet, method="svd")
