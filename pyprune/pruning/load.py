"""Load a channel- or layer-pruned model's state_dict into a fresh, unpruned instance of its architecture."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .channel import _restore, _snapshot
from .graph import _fix_attributes
from .layers import SKIP_STATE, Skip


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleList):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def _skip_removed_blocks(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Replace by :class:`Skip` each block the state_dict marks as removed (``<block>._extra_state``)."""
    suffix = "._extra_state"
    for key, value in state_dict.items():
        if not (key.endswith(suffix) and isinstance(value, dict) and value == SKIP_STATE):
            continue
        name = key[: -len(suffix)]
        try:
            block = model.get_submodule(name)
        except AttributeError:
            continue  # not this architecture's: the key check reports it
        if not isinstance(block, Skip):
            _replace(model, name, Skip())


def _never_pruned(mod: nn.Module, t_name: str) -> tuple[int, ...]:
    """Dimensions of ``mod``'s tensor ``t_name`` that channel pruning never cuts: a conv's kernel, an
    embedding's rows (the vocabulary)."""
    if isinstance(mod, nn.modules.conv._ConvNd) and t_name == "weight":
        return tuple(range(2, mod.weight.dim()))
    if isinstance(mod, nn.Embedding) and t_name == "weight":
        return (0,)
    return ()


def _shrink_tensors(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Give every parameter and buffer the shape its state_dict entry has (pruning only removes positions), and
    update the sizes its module keeps (in_channels, num_features, heads, ...) as prune_channels does."""
    own: dict[str, torch.Tensor] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        own[name] = t
    resized: dict[int, torch.Tensor] = {}  # id(old tensor) -> its replacement, so tied tensors stay tied
    touched: list[str] = []
    for key, value in state_dict.items():
        old = own.get(key)
        if old is None or not isinstance(value, torch.Tensor) or value.shape == old.shape:
            continue
        if value.dim() != old.dim() or any(s > o for s, o in zip(value.shape, old.shape)):
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(value.shape)}, but the model's is {tuple(old.shape)}: "
                "a pruned model's tensors have the model's dimensions, each no larger; is this the state_dict "
                "of a pruned instance of this architecture?"
            )
        mod_name, _, t_name = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        cut = [d for d in _never_pruned(mod, t_name) if value.shape[d] != old.shape[d]]
        if cut:
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(value.shape)}, but the model's is {tuple(old.shape)}: "
                f"dimension {cut[0]} of a {type(mod).__name__}'s {t_name} is never pruned"
            )
        new = resized.get(id(old))
        if new is None:
            new = torch.empty(value.shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            resized[id(old)] = new
        setattr(mod, t_name, new)
        if mod_name not in touched:
            touched.append(mod_name)
    for name in touched:
        _fix_attributes(model, name, 0)


def _check_keys(model: nn.Module, state_dict: Mapping[str, Any], strict: bool) -> None:
    own = model.state_dict(keep_vars=True)
    problems = []
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
            if any(".parametrizations." in f".{k}" for k in unexpected):
                problems.append(
                    "(mask parametrizations: call pyprune.pruning.remove_masks on the pruned model before "
                    "state_dict(), or sparsify this model first)"
                )
    for k, v in state_dict.items():
        mine = own.get(k)
        if not isinstance(mine, torch.Tensor):
            continue
        if not isinstance(v, torch.Tensor):
            problems.append(f"{k!r}: a {type(v).__name__}, not a tensor")
        elif v.shape != mine.shape:
            problems.append(f"{k!r}: shape {tuple(v.shape)} where the rebuilt model has {tuple(mine.shape)}")
        elif v.device.type == "meta" and mine.device.type != "meta":
            problems.append(f"{k!r}: on the meta device (it holds no values)")
    if problems:
        raise ValueError("state_dict does not fit this architecture, pruned or not: " + "; ".join(problems))


def load_pruned_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True
) -> torch.nn.modules.module._IncompatibleKeys:
    """``model.load_state_dict(state_dict)`` where ``state_dict`` comes from a pruned instance of ``model``'s
    architecture (:func:`prune_channels`, :func:`prune_layers`): first shrinks ``model`` in place to the
    state_dict's shapes, so a pruned model can be redeployed from its weights alone, without pickling it.

    Each parameter or buffer takes the shape of its entry (no dimension may grow), and its module's sizes
    follow (``in_channels``, ``out_features``, ``num_features``, attention heads; an ``nn.MultiheadAttention``
    whose width changed becomes a :class:`PrunedMultiheadAttention`, as prune_channels makes it); each block
    the state_dict marks as removed by prune_layers becomes a :class:`Skip`. Sizes that live only in code (a
    ``view(-1, 512)`` in a forward), in plain tensor attributes or in modules without tensors (a LayerNorm
    without affine, a BatchNorm without affine or running statistics) are not in a state_dict and are not
    rebuilt. Keys, shapes, devices and value types are checked before any weight is copied, and on such an
    error ``model`` is left as it was (an error inside torch's copy would leave it partly loaded, as
    ``load_state_dict`` does).
    Returns torch's ``(missing_keys, unexpected_keys)``. Converted models (SparseLinear, PrunedConv2d, masks)
    have other keys: load the pruned dense model, then convert it again.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    saved = _snapshot(model)
    try:
        _skip_removed_blocks(model, state_dict)
        _shrink_tensors(model, state_dict)
        _check_keys(model, state_dict, strict)
        return model.load_state_dict(state_dict, strict=strict)
    except BaseException:
        _restore(saved)
        raise


__all__ = ["load_pruned_state_dict"]
