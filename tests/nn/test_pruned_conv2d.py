"""PrunedConv2d: from_dense (BN folding, groups, depthwise, scatter), to_dense, state_dict, .to(), bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pyprune.nn import PrunedConv2d


def _masked_input(x, keep_in):
    m = torch.zeros(x.shape[1], dtype=x.dtype)
    m[keep_in] = 1
    return x * m.view(1, -1, 1, 1)


@pytest.fixture
def conv_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    bn = nn.BatchNorm2d(24).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return conv, bn


@pytest.mark.parametrize("channels_last", [False, True])
def test_from_dense_folds_bn_and_relu(conv_bn, channels_last):
    conv, bn = conv_bn
    keep_in, keep_out = [0, 3, 4, 9, 15], [1, 2, 8, 23]
    m = PrunedConv2d.from_dense(conv, keep_in, keep_out, bn=bn, relu=True)
    x = torch.randn(2, 16, 11, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.relu(bn(conv(_masked_input(x, keep_in))))[:, keep_out]
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
    assert m.weight.shape == (4, 5, 3, 3)


def test_scatter_output_lines_up_with_the_full_width(conv_bn):
    conv, _ = conv_bn
    keep_out = [0, 5, 6, 20]
    m = PrunedConv2d.from_dense(conv, keep_out=keep_out, scatter_output=True)
    x = torch.randn(1, 16, 8, 8)
    y = m(x)
    assert y.shape == (1, 24, 4, 4)
    torch.testing.assert_close(y[:, keep_out], conv(x)[:, keep_out], rtol=1e-4, atol=1e-5)
    others = [c for c in range(24) if c not in keep_out]
    assert (y[:, others] == 0).all()


def test_to_dense_is_equivalent(conv_bn):
    conv, bn = conv_bn
    m = PrunedConv2d.from_dense(conv, [1, 2, 3], [4, 5], bn=bn, relu=True, scatter_output=True)
    x = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(m.to_dense()(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cap, act", [(6.0, nn.ReLU6), (2.5, nn.Hardtanh)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_max_caps_the_relu_and_to_dense_says_how(conv_bn, channels_last, cap, act):
    # MobileNetV2's conv -> BN -> ReLU6, and its depthwise conv, as one module each
    conv, bn = conv_bn
    dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    with torch.no_grad():
        dw.weight.mul_(4)  # outputs past the cap
    x = 20 * torch.randn(2, 16, 11, 11)  # outputs past the cap
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cases = ((conv, bn, [0, 3, 4, 9, 15], [1, 2, 8, 23]), (dw, None, [1, 5, 6], [1, 5, 6]))
    for c, b, keep_in, keep_out in cases:
        m = PrunedConv2d.from_dense(c, keep_in, keep_out, bn=b, relu=True, relu_max=cap)
        want = (b(c(_masked_input(x, keep_in))) if b is not None else c(x)).clamp(0, cap)[:, keep_out]
        assert (want == cap).any()
        torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
        dense = m.to_dense()
        assert isinstance(dense[-1], act) and dense[-1].max_val == cap
        torch.testing.assert_close(dense(x), m(x), rtol=1e-4, atol=1e-5)
        assert f"relu_max={cap}" in repr(m)
    with pytest.raises(ValueError, match="relu_max must be None, or a number > 0 with relu=True"):
        PrunedConv2d.from_dense(conv, relu_max=6.0)


def test_depthwise_and_grouped():
    torch.manual_seed(1)
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    keep = [1, 2, 5]
    m = PrunedConv2d.from_dense(dw, keep, keep)
    assert m.groups == 3
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(m(x), dw(x)[:, keep], rtol=1e-5, atol=1e-6)
    g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    m = PrunedConv2d.from_dense(g, [0, 1, 4, 5], [0, 4])
    torch.testing.assert_close(m(x), g(_masked_input(x, [0, 1, 4, 5]))[:, [0, 4]], rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_and_to(conv_bn):
    conv, bn = conv_bn
    m = PrunedConv2d.from_dense(conv, [0, 7, 9], [3, 4, 10], bn=bn, relu=True)
    fresh = PrunedConv2d(16, 24, 3, keep_in=[0, 7, 9], keep_out=[3, 4, 10], stride=2, padding=1, relu=True)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(1, 16, 7, 7)
    torch.testing.assert_close(fresh(x), m(x))
    m64 = copy.deepcopy(m).to(torch.float64)
    assert m64.weight.dtype == torch.float64 and m64.in_index.dtype == torch.int64
    torch.testing.assert_close(m64(x.double()), m(x).double(), rtol=1e-5, atol=1e-6)
    assert "16->24 keeping 3->3" in repr(m) and "relu=True" in repr(m)


def test_gradients_reach_the_kept_weight(conv_bn):
    conv, _ = conv_bn
    m = PrunedConv2d.from_dense(conv, [0, 1, 2, 3], [0, 1])
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    m(x).square().sum().backward()
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    assert (x.grad[:, 4:] == 0).all() and x.grad[:, :4].abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"keep_in": [0, 16]}, ValueError, "keep_in.*\\[0, 16\\)"),
        ({"keep_in": [3, 1]}, ValueError, "keep_in.*sorted"),
        ({"keep_out": [1, 1]}, ValueError, "keep_out.*duplicates"),
        ({"keep_out": []}, ValueError, "keep_out must keep at least one"),
        ({"keep_in": torch.tensor([0.0, 1.0])}, TypeError, "keep_in must be a 1-D integer tensor"),
        ({"keep_in": ["a"]}, TypeError, "keep_in must be a sequence of ints"),
    ],
)
def test_bad_indices_are_named(conv_bn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PrunedConv2d.from_dense(conv_bn[0], **kwargs)


def test_bad_modules_and_inputs(conv_bn):
    conv, _ = conv_bn
    with pytest.raises(TypeError, match="conv must be a torch.nn.Conv2d"):
        PrunedConv2d.from_dense(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="grouped conv"):
        PrunedConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2), keep_in=[0, 1, 4], keep_out=[0, 4])
    with pytest.raises(ValueError, match="bn must be a BatchNorm2d"):
        PrunedConv2d.from_dense(conv, bn=nn.BatchNorm2d(5))
    m = PrunedConv2d.from_dense(conv, [0, 1])
    with pytest.raises(ValueError, match="in_channels=16"):
        m(torch.randn(1, 15, 8, 8))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(1, 16, 8, 8, dtype=torch.float64))


def test_keeps_its_own_copy_of_the_indices():
    # an int64 index tensor was kept as is: a later write into the caller's tensor changed which channels the
    # module read (its weight had been sliced with the old ones), and two modules built from one shared it
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    keep = torch.tensor([0, 2, 3, 5])
    a = PrunedConv2d.from_dense(conv, keep_in=keep)
    b = PrunedConv2d.from_dense(conv, keep_in=keep)
    x = torch.randn(1, 8, 5, 5)
    y = a(x)
    keep[0] = 1
    torch.testing.assert_close(a(x), y)
    a.in_index[1] = 4
    assert b.in_index.tolist() == [0, 2, 3, 5]


def test_builds_on_the_meta_device():
    # the index check read values (.item() on meta)
    m = PrunedConv2d(8, 16, 3, keep_in=[0, 1], device="meta")
    assert m.weight.is_meta and m.in_index.is_meta and m.weight.shape == (16, 2, 3, 3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_from_dense_fuses_a_max_pool(conv_bn, channels_last):
    conv, bn = conv_bn
    keep_in, keep_out = [0, 3, 4, 9, 15], [1, 2, 8, 23]
    for pool in (nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.MaxPool2d((3, 2), (1, 2), (1, 0))):
        m = PrunedConv2d.from_dense(conv, keep_in, keep_out, bn, True, True, max_pool=pool)  # relu, scatter
        x = torch.randn(2, 16, 13, 11)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        want = pool(torch.relu(bn(conv(_masked_input(x, keep_in)))))
        others = [c for c in range(24) if c not in keep_out]
        want[:, others] = 0
        torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.to_dense()(x), m(x), rtol=1e-5, atol=1e-6)
        assert f"max_pool={m.max_pool}" in repr(m)
    # the pool is configuration, as relu is: a module built with the same one loads the state
    fresh = PrunedConv2d(16, 24, 3, keep_in=keep_in, keep_out=keep_out, stride=2, padding=1, relu=True,
                         scatter_output=True, max_pool=((3, 2), (1, 2), (1, 0)))  # fmt: skip
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), m(x))


def test_bad_max_pools_are_named(conv_bn):
    conv, _ = conv_bn
    with pytest.raises(TypeError, match="max_pool must be a torch.nn.MaxPool2d"):
        PrunedConv2d.from_dense(conv, max_pool=nn.AvgPool2d(2))
    for pool in (nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(3, dilation=2),
                 nn.MaxPool2d(2, return_indices=True)):  # fmt: skip
        with pytest.raises(ValueError, match="max_pool must have dilation 1, ceil_mode=False"):
            PrunedConv2d.from_dense(conv, max_pool=pool)
    with pytest.raises(ValueError, match="max_pool.*padding <= kernel / 2"):
        PrunedConv2d(16, 24, 3, max_pool=(2, 2, 2))
    with pytest.raises(ValueError, match="max_pool' must be \\(kernel_size, stride, padding\\)"):
        PrunedConv2d(16, 24, 3, max_pool=(2, 2))


def test_forward_uses_a_parametrized_or_pruned_weight(conv_bn):
    # forward reads the weight from _parameters when it is there, else through the attribute: a
    # parametrization or torch.nn.utils.prune moves it out and computes it
    import torch.nn.utils.parametrize as P
    from torch.nn.utils import prune

    conv, _ = conv_bn
    x = torch.randn(1, 16, 7, 7)
    m = PrunedConv2d.from_dense(conv, [0, 3, 5], [1, 4])

    class Half(nn.Module):
        def forward(self, w):
            return w * 0.5

    plain = m(x)
    P.register_parametrization(m, "weight", Half())
    torch.testing.assert_close(m(x) - m.bias.view(1, -1, 1, 1), 0.5 * (plain - m.bias.view(1, -1, 1, 1)))
    m2 = PrunedConv2d.from_dense(conv, [0, 3, 5], [1, 4])
    prune.l1_unstructured(m2, "weight", amount=1.0)
    prune.l1_unstructured(m2, "bias", amount=1.0)
    assert (m2(x) == 0).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_residual_goes_in_before_the_relu(conv_bn, channels_last):
    # module(x, residual): relu(bn(conv(x))[scattered] + residual), a ResNet block's end as one op; the
    # residual's gradient is the output gradient where the ReLU let the sum through; torch.compile traces it
    conv, bn = conv_bn
    keep_in, keep_out = [0, 3, 4, 9, 15], [1, 2, 8, 23]
    m = PrunedConv2d.from_dense(conv, keep_in, keep_out, bn=bn, relu=True, scatter_output=True)
    x = torch.randn(2, 16, 11, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 24, 6, 6, requires_grad=True)
    full = torch.zeros(2, 24, 6, 6)
    full[:, keep_out] = bn(conv(_masked_input(x, keep_in)))[:, keep_out]
    want = torch.relu(full + res)
    y = m(x, res)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    assert (y == 0).any() and (y[:, 0] > 0).any()  # the sum crosses zero, the unkept channels pass res
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, res, g)
    torch.testing.assert_close(got, g * (want > 0))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, res), y)
    torch.testing.assert_close(m(x), m.to_dense()(x))  # to_dense: the calls without a residual
    with pytest.raises(ValueError, match="'residual'"):
        m(x, torch.randn(2, 4, 6, 6))
