"""A module built from a frozen layer stays frozen: from_dense and convert copy requires_grad (they built new
Parameters, which train by default, and a fine-tune over the parameters that require grad then updated it)."""

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import pyprune
from pyprune.nn import PrunedConv2d, SparseConv2d, SparseLinear


def _flags(m: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("layout", ["csr", "bsr", "2:4"])
@pytest.mark.parametrize("frozen", [(), ("weight",), ("bias",), ("weight", "bias")])
def test_sparse_modules_keep_requires_grad(layout, frozen):
    lin, conv = nn.Linear(16, 8), nn.Conv2d(8, 8, 3)
    for src in (lin, conv):
        for name in frozen:
            getattr(src, name).requires_grad_(False)
    want = {"weight.values": "weight" not in frozen, "bias": "bias" not in frozen}
    assert _flags(SparseLinear.from_dense(lin, sparsity=0.5, layout=layout, block=(4, 4))) == want
    assert _flags(SparseConv2d.from_dense(conv, sparsity=0.5, layout=layout, block=(4, 4))) == want


def test_pruned_conv_keeps_requires_grad_and_its_folded_bias_trains_with_the_bn():
    conv, bn = nn.Conv2d(4, 6, 3, bias=False).requires_grad_(False), nn.BatchNorm2d(6).eval()
    assert _flags(PrunedConv2d.from_dense(conv, keep_in=[0, 2])) == {"weight": False}
    assert _flags(PrunedConv2d.from_dense(conv, keep_in=[0, 2], bn=bn)) == {"weight": False, "bias": True}
    bn.requires_grad_(False)
    assert _flags(PrunedConv2d.from_dense(conv, keep_in=[0, 2], bn=bn)) == {"weight": False, "bias": False}


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_convert_keeps_a_frozen_masked_layer_frozen(layout):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Conv2d(1, 4, 3), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    masked = pyprune.sparsify(model, sparsity=0.5)
    with torch.no_grad():  # the masked weight computed under no_grad carries no flag: the stored one decides
        fast = pyprune.convert(masked, layout=layout, block=(4, 4))
    assert set(_flags(fast[0]).values()) == {False} and set(_flags(fast[2]).values()) == {False}
    assert set(_flags(fast[3]).values()) == {True}


def test_convert_auto_keeps_a_frozen_layer_frozen():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    masked = pyprune.sparsify(model, sparsity=0.5)
    fast = pyprune.convert(masked, layout="auto", example_inputs=torch.randn(4, 16))
    assert set(_flags(fast[0]).values()) == {False} and set(_flags(fast[2]).values()) == {True}


def test_torch_prune_mask_applied_under_no_grad_keeps_the_layer_trainable():
    # torch.nn.utils.prune recomputes .weight in a pre-hook: made under no_grad it has no flag; weight_orig has
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        torch.nn.utils.prune.l1_unstructured(lin, "weight", amount=0.5)
    assert SparseLinear.from_dense(lin).weight.values.requires_grad


@pytest.mark.parametrize("frozen", [True, False])
def test_to_dense_keeps_requires_grad(frozen):
    lin, conv = nn.Linear(16, 8).requires_grad_(not frozen), nn.Conv2d(8, 8, 3).requires_grad_(not frozen)
    for m in (SparseLinear.from_dense(lin, 0.5), SparseConv2d.from_dense(conv, 0.5)):
        assert set(_flags(m.to_dense()).values()) == {not frozen}
    dense = PrunedConv2d.from_dense(conv, keep_in=[0, 2]).to_dense()
    assert set(_flags(dense).values()) == {not frozen}
