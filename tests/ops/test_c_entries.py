"""Calls that need no autograd enter each op through its typed C++ entry in pyprune._C (the dispatcher below
the Autograd key, ops._common.call_op) instead of torch.ops' Python binding: the same result, seen by
dispatch modes and the profiler as torch.ops' call is; autograd, torch.compile and __torch_function__
overrides take torch.ops."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from pyprune.nn import MaxPool2d, PrunedConv2d, SparseConv2d, SparseLinear

common = importlib.import_module("pyprune.ops._common")

pytestmark = pytest.mark.skipif(not common.C_ENTRIES, reason="pyprune._C not built")


def _module(name):
    """A small module whose forward calls op `name` once, and an input for it."""
    torch.manual_seed(0)
    if name.endswith("linear"):
        layout = {"csr_linear": "csr", "bsr_linear": "bsr", "sparse24_linear": "2:4"}[name]
        sparsity = 0.5 if layout == "2:4" else 0.7
        m = SparseLinear.from_dense(torch.nn.Linear(40, 24), sparsity=sparsity, layout=layout, block=(8, 8))
        return m, torch.randn(3, 5, 40)
    if name == "pruned_conv2d":
        m = PrunedConv2d.from_dense(torch.nn.Conv2d(8, 12, 3, padding=1), keep_in=[0, 2, 5, 7], relu=True)
        return m, torch.randn(2, 8, 9, 9)
    if name == "max_pool2d":
        return MaxPool2d(3, 2, 1), torch.randn(2, 8, 9, 9)
    layout = {"csr_conv2d": "csr", "bsr_conv2d": "bsr", "sparse24_conv2d": "2:4"}[name]
    conv = torch.nn.Conv2d(16, 12, 3, padding=1)
    block = {"block": (4, 4)} if layout == "bsr" else {}
    m = SparseConv2d.from_dense(conv, sparsity=0.5, layout=layout, **block)
    return m, torch.randn(2, 16, 7, 7)


NAMES = ["csr_linear", "bsr_linear", "sparse24_linear", "csr_conv2d", "bsr_conv2d", "sparse24_conv2d",
         "pruned_conv2d", "max_pool2d"]  # fmt: skip


@pytest.fixture
def spy(monkeypatch):
    """spy(name) -> list that grows by one with each call through op `name`'s C entry."""

    def install(name):
        op = getattr(torch.ops.pyprune, name).default
        entry, calls = common.C_ENTRIES[op], []

        def counted(*args):
            calls.append(1)
            return entry(*args)

        monkeypatch.setitem(common.C_ENTRIES, op, counted)
        return calls

    return install


def test_every_public_op_has_an_entry():
    assert {op.name() for op in common.C_ENTRIES} == {f"pyprune::{n}" for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_no_grad_calls_take_the_entry_with_torch_ops_result(spy, monkeypatch, name):
    m, x = _module(name)
    calls = spy(name)
    with torch.no_grad():
        y = m(x)
        assert calls == [1]
        with monkeypatch.context() as off:
            off.setattr(common, "C_ENTRIES", {})
            assert torch.equal(m(x), y)
        with torch.profiler.profile() as prof:
            m(x)
        assert f"pyprune::{name}" in [e.key for e in prof.key_averages()]
        with FakeTensorMode(allow_non_fake_inputs=True) as fake:
            assert m(fake.from_tensor(x)).shape == y.shape
        assert len(calls) == 3


@pytest.mark.parametrize("name", NAMES)
def test_autograd_compile_and_torch_function_take_torch_ops(spy, name):
    m, x = _module(name)
    calls = spy(name)
    # grad mode and a weight (a max pool has none: its input) that requires grad: the autograd kernel's path
    y = m(x if list(m.parameters()) else x.clone().requires_grad_())
    assert y.grad_fn is not None
    x_grad = x.clone().requires_grad_()
    with torch.no_grad():
        y0 = m(x)
    torch.testing.assert_close(y.detach(), y0)
    assert len(calls) == 1  # only the no_grad call
    with torch.enable_grad():
        for p in m.parameters():
            p.requires_grad_(False)
        assert m(x_grad).grad_fn is not None  # x alone needs the gradient
    assert len(calls) == 1

    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with Passthrough():
            torch.testing.assert_close(m(x), y0)
        assert len(calls) == 1
        torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="eager")(x), y0)
        assert len(calls) == 1


@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(name):
    import torch.autograd.forward_ad as fwAD

    m, x = _module(name)
    with torch.no_grad(), fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=f"pyprune::{name}: forward-mode AD"):
            m(fwAD.make_dual(x, torch.randn_like(x)))
        torch.testing.assert_close(m(x), m(x.clone()))  # a level open, no tangent on the op's arguments
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(m, (x,), (torch.randn_like(x),))


def test_flop_counter_sees_pruned_conv2d_through_the_entry(spy):
    m, x = _module("pruned_conv2d")
    calls = spy("pruned_conv2d")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(x)
    assert calls == [1] and counter.get_total_flops() == 2 * 12 * 4 * 9 * 2 * 81


def test_the_op_checks_run_through_the_entry(spy):
    m, x = _module("pruned_conv2d")
    calls = spy("pruned_conv2d")
    with torch.no_grad(), pytest.raises(ValueError, match="'residual'"):
        m(x, torch.randn(2, 12, 9, 8))
    assert calls == [1]
