"""Which of a source layer's parameters train, so a module built from another (from_dense, to_dense, convert)
keeps a frozen layer frozen."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize


def trains(m: nn.Module, name: str) -> bool | None:
    """Whether ``m``'s parameter ``name`` (weight, bias, weight.values) requires grad, or None if ``m`` has none.
    Under a mask, the stored original decides (pyprune's parametrization, or torch.nn.utils.prune's
    ``<name>_orig``): the computed tensor carries no flag under torch.no_grad."""
    owner_name, _, attr = name.rpartition(".")
    owner = m.get_submodule(owner_name) if owner_name else m
    if parametrize.is_parametrized(owner, attr):
        return any(p.requires_grad for p in owner.parametrizations[attr].parameters())
    p = getattr(owner, attr + "_orig", None)
    if not isinstance(p, nn.Parameter):
        p = getattr(owner, attr, None)
    return None if p is None else p.requires_grad


def copy_requires_grad(dst: nn.Module, src: nn.Module, names: dict[str, str] | None = None) -> nn.Module:
    """``dst``'s parameters named by the keys of ``names`` (default weight and bias) take the requires_grad of
    ``src``'s named by its values, where both exist; returns ``dst``."""
    for d, s in (names or {"weight": "weight", "bias": "bias"}).items():
        flag = trains(src, s)
        owner_name, _, attr = d.rpartition(".")
        p = getattr(dst.get_submodule(owner_name) if owner_name else dst, attr, None)
        if flag is not None and isinstance(p, nn.Parameter):
            p.requires_grad_(flag)
    return dst
