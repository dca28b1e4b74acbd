"""pyprune.nn.MaxPool2d: a drop-in nn.MaxPool2d through pyprune::max_pool2d."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.nn import MaxPool2d, PrunedConv2d


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_from_dense_matches_the_pool_and_keeps_the_format(channels_last):
    pool = nn.MaxPool2d(3, 2, 1)
    m = MaxPool2d.from_dense(pool)
    assert isinstance(m, nn.MaxPool2d)  # where code checks for a max pool, this one still is
    x = torch.randn(2, 16, 21, 20)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    y = m(x)
    assert torch.equal(y, pool(x))
    assert y.is_contiguous(memory_format=fmt)
    assert torch.equal(m(x[0]), pool(x[0]))  # unbatched (C, H, W), as nn.MaxPool2d takes


def test_to_dense_round_trip_and_repr():
    m = MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0))
    d = m.to_dense()
    assert type(d) is nn.MaxPool2d
    assert (d.kernel_size, d.stride, d.padding) == ((3, 2), (2, 1), (1, 0))
    x = torch.randn(1, 4, 11, 8)
    assert torch.equal(m(x), d(x))
    assert "kernel_size=(3, 2)" in repr(m)
    assert MaxPool2d(2).stride == 2  # stride defaults to the kernel, as in nn.MaxPool2d


def test_gradients_and_state_dict():
    m = MaxPool2d(2)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    m(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.max_pool2d(x2, 2).square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert m.state_dict() == {}
    assert torch.equal(copy.deepcopy(m)(x), m(x))


def test_fuses_into_pruned_conv2d_like_nn_max_pool2d():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    a = PrunedConv2d.from_dense(conv, max_pool=MaxPool2d(3, 2, 1))
    b = PrunedConv2d.from_dense(conv, max_pool=nn.MaxPool2d(3, 2, 1))
    x = torch.randn(1, 3, 12, 12)
    assert torch.equal(a(x), b(x))


def test_bad_pools_are_named():
    with pytest.raises(TypeError, match="pool must be a torch.nn.MaxPool2d, got AvgPool2d"):
        MaxPool2d.from_dense(nn.AvgPool2d(2))
    for kw in ({"dilation": 2}, {"ceil_mode": True}, {"return_indices": True}):
        with pytest.raises(ValueError, match="pool must have dilation 1, ceil_mode=False and return_indices"):
            MaxPool2d.from_dense(nn.MaxPool2d(3, **kw))
    with pytest.raises(ValueError, match="max_pool2d: argument 'padding'"):
        MaxPool2d(2, padding=2)(torch.randn(1, 1, 8, 8))
