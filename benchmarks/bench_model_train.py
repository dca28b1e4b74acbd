"""pytest-benchmark: one training step (forward, mean-square loss, backward, SGD) of ResNet-18 on 64x64 images,
batch 2, dense and pruned to 90% (masked dense; SparseConv2d / SparseLinear csr and bsr; the masks converted
per layer for training): see model_train_table.py, which times ResNet-50 at 224x224 in interleaved rounds.

CI runs this with --benchmark-disable (each case once, as a smoke test).
"""

import pytest
import torch
from model_train_table import step_fn, variants
from sparse_linear_providers import environment

from pyprune.compare.cli import model_and_inputs
from pyprune.nn import SparseConv2d

_models: dict = {}


@pytest.mark.parametrize("variant", ["dense", "masked", "csr", "bsr", "auto"])
def test_model_train_step(benchmark, variant):
    if not _models:
        torch.manual_seed(0)
        model, inputs = model_and_inputs("resnet18", batch=2, image=64)
        _models.update(variants(model, 0.9, inputs), inputs=inputs)
    model = _models[variant]
    convs = [m for m in model.modules() if isinstance(m, SparseConv2d)]
    if variant != "auto":  # auto: whichever form each layer timed fastest in
        assert bool(convs) == (variant in ("csr", "bsr"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    benchmark(step_fn(model, _models["inputs"]))
    # the step trained: every parameter got a gradient, and SGD moved some
    assert all(p.grad is not None for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    benchmark.extra_info.update(
        {"model": "resnet18", "batch": 2, "image": 64, "sparsity": 0.9, "variant": variant, **environment()}
    )
