"""Layer pruning: remove whole residual blocks whose output has the shape of their input."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .graph import PruningError, trace
from .masks import copy_of

LAYER_IMPORTANCE = ("residual_norm", "l1", "random")
# Ops through which "the block's input" stays the block's input for the residual check.
_SAME_SHAPE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Identity,
    nn.Dropout,
    nn.LayerNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
)
_ADDS = {operator.add, operator.iadd, torch.add}


# A removed block's one state_dict entry (``<block>._extra_state``), which load_pruned_state_dict reads
SKIP_STATE = {"pyprune": "Skip"}


class Skip(nn.Module):
    """Stands in for a removed residual block: returns its first argument unchanged. Its state_dict holds one
    entry, ``_extra_state``, marking the block as removed."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def get_extra_state(self) -> dict[str, str]:
        return dict(SKIP_STATE)

    def set_extra_state(self, state: Any) -> None:
        if state != SKIP_STATE:
            raise ValueError(f"Skip: state_dict entry '_extra_state' must be {SKIP_STATE}, got {state!r}")


def _is_residual(block: nn.Module) -> bool:
    """True if the block's output is ``input + f(input)`` up to activations / norms (traced with torch.fx)."""
    if isinstance(block, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return True  # residual by construction; their fast-path checks don't trace
    try:
        gm = trace(block, 1)
    except PruningError:
        return False
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        return False
    identity_like: set[fx.Node] = {placeholders[0]}
    for n in nodes:
        if (
            n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), _SAME_SHAPE_MODULES)
            and n.args
            and n.args[0] in identity_like
        ):
            identity_like.add(n)
        elif (
            n.op == "call_function"
            and n.target in _ADDS
            and any(a in identity_like for a in n.args)
            and n.args[0] is not n.args[-1]
        ):
            identity_like.add(n)
        elif (
            n.op in ("call_function", "call_method")
            and getattr(n.target, "__name__", n.target) in ("relu", "gelu", "dropout")
            and n.args
            and n.args[0] in identity_like
        ):
            identity_like.add(n)
    out = next(n for n in nodes if n.op == "output")
    return out.args[0] in identity_like and out.args[0] is not placeholders[0]


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks ``prune_layers`` may remove: residual children of nn.Sequential / nn.ModuleList."""
    names = []
    modules = dict(model.named_modules())
    for parent_name, parent in modules.items():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        owner = modules.get(parent_name.rpartition(".")[0]) if parent_name else None
        for child_name, child in parent.named_children():
            if isinstance(child, Skip) or not list(child.children()):
                continue
            if isinstance(owner, (nn.TransformerEncoder, nn.TransformerDecoder)) and child_name == "0":
                continue  # their forward reads attributes of layers[0] (fast-path checks)
            if _is_residual(child):
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def _overlap(a: str, b: str) -> bool:
    """True if block ``a`` lies inside block ``b`` or contains it."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def _most_disjoint(names: list[str]) -> int:
    """The most blocks of ``names`` that can be removed together, none inside another."""
    tops = [a for a in names if not any(a.startswith(b + ".") for b in names)]
    return sum(max(1, _most_disjoint([d for d in names if d.startswith(t + ".")])) for t in tops)


def _block_scores(
    model: nn.Module, names: list[str], importance: str, example_inputs: Any, seed: int
) -> torch.Tensor:
    if importance == "random":
        return torch.rand(len(names), generator=torch.Generator().manual_seed(seed))
    if importance == "l1":
        out = []
        for n in names:
            ws = [p.detach().abs().mean() for p in model.get_submodule(n).parameters() if p.dim() > 1]
            out.append(torch.stack(ws).mean() if ws else torch.tensor(0.0))
        return torch.stack(out)
    if example_inputs is None:
        raise ValueError(
            "importance='residual_norm' needs example_inputs=<tensor or tuple> to measure how much "
            "each block changes its input; pass them or use importance='l1'"
        )
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    change: dict[str, float] = {}

    def hook(name: str):
        def fn(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            change[name] = float((output - x).norm() / x.norm().clamp_min(1e-12))

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*args)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return torch.tensor([change.get(n, float("inf")) for n in names])


def prune_layers(
    model: nn.Module,
    n: int | None = None,
    ratio: float | None = None,
    importance: str = "residual_norm",
    example_inputs: torch.Tensor | tuple | None = None,
    inplace: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Replace the ``n`` (or ``ratio`` of the) least important residual blocks by :class:`Skip`.

    Candidates are the residual children of nn.Sequential / nn.ModuleList containers (see
    :func:`residual_blocks`): ResNet blocks without downsampling, MobileNetV2 blocks with a skip connection,
    transformer encoder layers. Remaining blocks keep their names, so the pruned model's state_dict keys are
    those of the original's remaining blocks plus one ``<block>._extra_state`` marker per removed block;
    :func:`load_pruned_state_dict` rebuilds the pruned model from it.

    importance: "residual_norm" (needs ``example_inputs``: blocks that change their input least go first),
    "l1" (mean |w| of the block's weights), "random".

    Candidates may nest (a residual group of residual blocks). The ``n`` replaced blocks never overlap, so
    ``n`` is at most the number of blocks removable together and ``ratio`` is a fraction of that number.
    Blocks are taken least important first, skipping one that contains or lies inside a block already taken,
    or whose removal would leave fewer than ``n`` blocks removable in all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if (n is None) == (ratio is None):
        raise ValueError(
            "prune_layers needs exactly one of n=<number of blocks> or ratio=<fraction in [0, 1)>"
        )
    if importance not in LAYER_IMPORTANCE:
        raise ValueError(f"importance must be one of {LAYER_IMPORTANCE}, got {importance!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (seeds importance='random'), got {seed!r}")
    names = residual_blocks(model)
    most = _most_disjoint(names)
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1) (fraction of residual blocks removed), got {ratio!r}")
        n = int(ratio * most)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > most:
        raise ValueError(
            f"n must be an int in [0, {most}] (the model has {most} residual blocks that can be removed "
            f"together), got {n!r}"
        )
    target = model if inplace else copy_of(model)
    if n == 0:
        return target
    scores = _block_scores(target, names, importance, example_inputs, seed)
    chosen: list[str] = []
    for i in torch.argsort(scores, stable=True).tolist():
        if len(chosen) == n:
            break
        if any(_overlap(names[i], c) for c in chosen):
            continue
        taken = chosen + [names[i]]
        free = [b for b in names if b not in taken and not any(_overlap(b, c) for c in taken)]
        if len(taken) + _most_disjoint(free) >= n:
            chosen.append(names[i])
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        if isinstance(parent, nn.ModuleList):
            parent[int(attr)] = Skip()
        else:
            setattr(parent, attr, Skip())
    return target


__all__ = ["LAYER_IMPORTANCE", "Skip", "prune_layers", "residual_blocks"]
