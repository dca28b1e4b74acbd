import copy

import pytest
import torch
from torch import nn

from pyprune.pruning import plan_pruning


def zero_removed_inputs(model: nn.Module, graph, removed: dict) -> nn.Module:
    """Copy of ``model`` whose consumers ignore the channels chosen for removal.

    For networks without LayerNorm, pruning those channels must then leave every output unchanged, which
    checks the dependency graph and the slicing together.
    """
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for g in graph.groups:
            idx = removed.get(g.index)
            if idx is None or idx.numel() == 0:
                continue
            for m in g.members:
                if m.role == "in":
                    t = getattr(ref.get_submodule(m.module), m.tensor)
                    t.index_fill_(m.dim, m.positions(idx).reshape(-1), 0.0)
    return ref


@pytest.fixture
def exactness():
    """check(model, x, **kwargs): prune and compare with the consumer-zeroed original."""
    from pyprune import prune_channels

    def check(model, x, **kwargs):
        model.eval()
        graph, plan, removed = plan_pruning(model, x, **kwargs)
        assert plan.removed_channels > 0
        pruned = prune_channels(model, x, **kwargs).eval()
        ref = zero_removed_inputs(model, graph, removed).eval()
        args = x if isinstance(x, tuple) else (x,)
        with torch.no_grad():
            torch.testing.assert_close(pruned(*args), ref(*args), rtol=1e-4, atol=1e-5)
        return pruned, plan

    return check


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
