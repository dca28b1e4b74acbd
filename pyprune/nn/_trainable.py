"""Which of a source layer's parameters train, so a module built ``from_dense`` keeps a frozen layer frozen."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize


def trains(m: nn.Module, name: str) -> bool | None:
    """Whether ``m``'s parameter ``name`` (weight, bias) requires grad, or None if ``m`` has none. Under a
    parametrization (pyprune's masks) its stored original decides: the computed tensor has no flag under
    torch.no_grad."""
    if parametrize.is_parametrized(m, name):
        return any(p.requires_grad for p in m.parametrizations[name].parameters())
    p = getattr(m, name, None)
    return None if p is None else p.requires_grad
