"""Structured channel pruning: shrink coupled groups of channels and return a smaller dense model."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import attention  # noqa: F401  (registers the attention leaf handlers)
from . import criteria
from .graph import DependencyGraph, Group, Member, PruningError, build_graph, slice_model
from .masks import copy_of

IMPORTANCE = ("l1", "l2", "bn_scale", "taylor", "fpgm", "thinet", "random")
_NEEDS_DATA = ("taylor", "thinet")
_THINET_SAMPLES_PER_BATCH = 128  # sampled (location, output channel) pairs per batch and consumer layer


@dataclass
class GroupPlan:
    """What happens to one group of coupled channels."""

    index: int
    channels: int
    keep: int
    removed: list[int]
    layers: list[str]
    pinned: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class PruningPlan:
    """Report of ``prune_channels(..., dry_run=True)``: every group and the channels that would be removed."""

    importance: str
    groups: list[GroupPlan]

    @property
    def prunable(self) -> list[GroupPlan]:
        return [g for g in self.groups if not g.pinned]

    @property
    def removed_channels(self) -> int:
        return sum(len(g.removed) for g in self.groups)

    def __str__(self) -> str:
        lines = [f"{'group':>5} {'channels':>8} {'keep':>6}  layers / why kept"]
        for g in self.groups:
            layers = ", ".join(g.layers[:4]) + (f" (+{len(g.layers) - 4})" if len(g.layers) > 4 else "")
            why = f"  [pinned: {g.pinned[0]}]" if g.pinned else (f"  [{g.note}]" if g.note else "")
            lines.append(f"{g.index:>5} {g.channels:>8} {g.keep:>6}  {layers}{why}")
        lines.append(
            f"importance={self.importance}; {self.removed_channels} channels removed in "
            f"{sum(bool(g.removed) for g in self.groups)} groups"
        )
        return "\n".join(lines)


def _as_args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple of tensors (the positional arguments of "
        f"model.forward), got {type(example_inputs).__name__}"
    )


def _check_ratio(name: str, r: Any) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of channels to remove), got {r!r}")
    return float(r)


def _check_names(arg: str, names: Iterable[str], model: nn.Module) -> None:
    known = {n for n, _ in model.named_modules()}
    for n in names:
        if n not in known:
            close = sorted(k for k in known if k and (n in k or k.endswith(n.rsplit(".", 1)[-1])))[:5]
            raise ValueError(
                f"{arg}: model has no layer named {n!r}"
                + (f"; did you mean one of {close}?" if close else "")
            )


def _tensor(model: nn.Module, m: Member) -> torch.Tensor:
    return getattr(model.get_submodule(m.module) if m.module else model, m.tensor)


def _rows(t: torch.Tensor, m: Member, channels: int) -> torch.Tensor:
    """The (channels, k) slice of ``t`` that belongs to the member's channels."""
    pos = m.positions(torch.arange(channels))
    moved = t.detach().movedim(m.dim, 0)
    return moved[pos.reshape(-1)].reshape(channels, -1)


def _group_rows(model: nn.Module, g: Group, roles: tuple[str, ...]) -> torch.Tensor | None:
    rows = [_rows(_tensor(model, m), m, g.channels) for m in g.members if m.role in roles]
    return torch.cat(rows, 1) if rows else None


def _split_batch(batch: Any) -> tuple[tuple, Any]:
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y
    raise TypeError(
        f"data must yield tensors or (inputs, targets) pairs, got a batch of type {type(batch).__name__}"
    )


def _taylor(
    model: nn.Module, groups: list[Group], data: Iterable, loss_fn: Callable
) -> dict[int, torch.Tensor]:
    scratch = copy.deepcopy(model).eval()  # gradients land on a copy, never on the user's parameters
    acc = {g.index: torch.zeros(g.channels, dtype=torch.double) for g in groups}
    n_batches = 0
    for batch in data:
        inputs, target = _split_batch(batch)
        scratch.zero_grad(set_to_none=True)
        out = scratch(*inputs)
        loss = loss_fn(out, target) if target is not None else loss_fn(out)
        loss.backward()
        n_batches += 1
        for g in groups:
            ws, gs = [], []
            for m in g.members:
                t = _tensor(scratch, m) if m.tensor is not None else None
                if isinstance(t, nn.Parameter) and t.grad is not None:
                    ws.append(_rows(t, m, g.channels))
                    gs.append(_rows(t.grad, m, g.channels))
            if ws:
                acc[g.index] += criteria.taylor(torch.cat(ws, 1), torch.cat(gs, 1))
    if n_batches == 0:
        raise ValueError("data is empty: importance='taylor' needs at least one batch")
    return acc


def _thinet_consumer(model: nn.Module, g: Group) -> Member | None:
    for m in g.members:
        if m.role != "in" or m.tensor != "weight" or m.dim != 1:
            continue
        mod = model.get_submodule(m.module)
        if isinstance(mod, nn.Linear) or (
            isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros"
        ):
            return m
    return None


def _unfold(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The patches ``conv`` multiplies: (N, C_in, H, W) -> (N, C_in * kh * kw, L)."""
    pad = conv.padding
    if isinstance(pad, str):  # "valid", or "same" padded as nn.Conv2d does: an odd total's extra on the right
        total = [0 if pad == "valid" else d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        x = F.pad(x, [p for t in reversed(total) for p in (t // 2, t - t // 2)])
        pad = 0
    return F.unfold(x, conv.kernel_size, conv.dilation, pad, conv.stride)


def _thinet(
    model: nn.Module, groups: list[Group], data: Iterable, seed: int
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    scratch = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    samples: dict[int, list[torch.Tensor]] = {g.index: [] for g in groups}
    notes: dict[int, str] = {}
    hooks = []

    def make_hook(g: Group, m: Member) -> Callable:
        def hook(mod: nn.Module, inputs: tuple, _out: Any) -> None:
            x, w = inputs[0].detach(), mod.weight.detach()
            pos = m.positions(torch.arange(g.channels))  # (C, P) input positions per channel
            s = _THINET_SAMPLES_PER_BATCH
            o = torch.randint(w.shape[0], (s,), generator=gen)
            if isinstance(mod, nn.Linear):
                rows = x.reshape(-1, x.shape[-1])
                r = torch.randint(rows.shape[0], (s,), generator=gen)
                z = (rows[r][:, pos] * w[o][:, pos]).sum(-1)
            else:
                cols = _unfold(x, mod)
                cols = cols.reshape(x.shape[0], x.shape[1], -1, cols.shape[-1])  # (N, C_in, kh*kw, L)
                nb = torch.randint(cols.shape[0], (s,), generator=gen)
                loc = torch.randint(cols.shape[-1], (s,), generator=gen)
                patch = cols[nb, :, :, loc]  # (S, C_in, kh*kw)
                wk = w.reshape(w.shape[0], w.shape[1], -1)[o]
                z = (patch[:, pos] * wk[:, pos]).sum((-1, -2))
            samples[g.index].append(z)

        return hook

    for g in groups:
        m = _thinet_consumer(scratch, g)
        if m is None:
            notes[g.index] = "no conv/linear reads these channels: l1 used instead of thinet"
            continue
        hooks.append(scratch.get_submodule(m.module).register_forward_hook(make_hook(g, m)))
    try:
        with torch.no_grad():
            n_batches = 0
            for batch in data:
                scratch(*_split_batch(batch)[0])
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise ValueError("data is empty: importance='thinet' needs at least one batch")
    scores = {}
    for g in groups:
        if samples[g.index]:
            scores[g.index] = criteria.thinet_scores(torch.cat(samples[g.index]))
        else:
            scores[g.index] = criteria.l1_norm(_group_rows(model, g, ("out",)))
    return scores, notes


def _scores(
    model: nn.Module,
    groups: list[Group],
    importance: str,
    data: Iterable | None,
    loss_fn: Callable | None,
    seed: int,
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    notes: dict[int, str] = {}
    if importance == "taylor":
        return _taylor(model, groups, data, loss_fn), notes
    if importance == "thinet":
        return _thinet(model, groups, data, seed)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        if importance == "random":
            out[g.index] = criteria.random_scores(g.channels, gen)
            continue
        if importance == "bn_scale":
            gammas = [
                _rows(_tensor(model, m), m, g.channels).abs().sum(1)
                for m in g.members
                if m.role == "norm"
                and m.tensor == "weight"
                and isinstance(model.get_submodule(m.module), nn.modules.batchnorm._BatchNorm)
            ]
            if gammas:
                out[g.index] = criteria.bn_scale(torch.stack(gammas).sum(0))
                continue
            notes[g.index] = "no BatchNorm in this group: l1 used instead of bn_scale"
        rows = _group_rows(model, g, ("out",))
        fn = {"l2": criteria.l2_norm, "fpgm": criteria.fpgm}.get(importance, criteria.l1_norm)
        out[g.index] = fn(rows)
    return out, notes


def _round_keep(keep: int, channels: int, round_to: int, g: Group) -> int:
    if "(heads)" in " ".join(g.origin):
        return keep  # heads are whole units already
    return min(channels, math.ceil(keep / round_to) * round_to)


def _lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    # Stable sort so ties (e.g. equal norms) resolve to the lower channel index, deterministically.
    return torch.sort(torch.argsort(scores, stable=True)[:n]).values


def _protect(graph: DependencyGraph) -> None:
    weighted = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)
    names = [
        str(n.target)
        for n in graph.traced.graph.nodes
        if n.op == "call_module" and isinstance(graph.model.get_submodule(str(n.target)), weighted)
    ]
    if not names:
        return
    for g in graph.group_of(names[0], "out"):
        g.pinned.append(f"first layer {names[0]} (protect_first_last=True)")
    for g in graph.group_of(names[-1], "in"):
        g.pinned.append(f"input of last layer {names[-1]} (protect_first_last=True)")


def plan_pruning(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    importance: str = "l1",
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    round_to: int = 1,
    per_layer: Mapping[str, float] | None = None,
    ignore: Iterable[str] = (),
    protect_first_last: bool = True,
    global_ranking: bool = False,
    seed: int = 0,
) -> tuple[DependencyGraph, PruningPlan, dict[int, torch.Tensor]]:
    """Validate arguments, build the dependency graph, choose the channels to remove (see prune_channels)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args = _as_args(example_inputs)
    ratio = _check_ratio("ratio", ratio)
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    if importance in _NEEDS_DATA and data is None:
        raise ValueError(
            f"importance={importance!r} needs data=<iterable of batches> (e.g. a DataLoader); pass "
            "data or choose importance='l1'"
        )
    if importance == "taylor" and loss_fn is None:
        raise ValueError("importance='taylor' needs loss_fn=<callable(output, target) -> scalar loss>")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(
            f"round_to must be a positive int (kept channels become a multiple of it), got {round_to!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (seeds 'random' and ThiNet's sampling), got {seed!r}")
    ignore = [ignore] if isinstance(ignore, str) else list(ignore)
    _check_names("ignore", ignore, model)
    per_layer = dict(per_layer or {})
    _check_names("per_layer", per_layer, model)
    for k, v in per_layer.items():
        _check_ratio(f"per_layer[{k!r}]", v)

    graph = build_graph(model, args, set(ignore))
    if protect_first_last:
        _protect(graph)
    groups = [g for g in graph.groups if g.prunable]
    ratios = {g.index: ratio for g in groups}
    overridden: set[int] = set()
    for name, r in per_layer.items():
        hit = [
            g
            for g in groups
            if any(m.module == name or m.module.startswith(name + ".") for m in g.members if m.role == "out")
        ]
        if not hit:
            why = sorted(
                {p for g in graph.groups for p in g.pinned if any(m.module == name for m in g.members)}
            ) or ["it produces no prunable channels"]
            raise ValueError(
                f"per_layer[{name!r}]: the output channels of {name!r} can't be pruned ({why[0]}); "
                "remove it from per_layer"
            )
        for g in hit:
            # Two overrides reaching one coupled group (two convs feeding a residual add): the larger wins.
            ratios[g.index] = max(r, ratios[g.index]) if g.index in overridden else r
            overridden.add(g.index)

    scores, notes = _scores(model, groups, importance, data, loss_fn, seed) if groups else ({}, {})
    removed: dict[int, torch.Tensor] = {}
    keep_count: dict[int, int] = {}
    global_groups = [g for g in groups if global_ranking and g.index not in overridden]
    if global_groups:
        # Scores of different layers have different scales; dividing by each group's mean makes them
        # comparable.
        norm = torch.cat([scores[g.index] / scores[g.index].mean().clamp_min(1e-12) for g in global_groups])
        owner = torch.cat([torch.full((g.channels,), i) for i, g in enumerate(global_groups)])
        n_remove = int(math.floor(ratio * len(norm)))
        drop = torch.argsort(norm, stable=True)[:n_remove]
        for i, g in enumerate(global_groups):
            keep = g.channels - int((owner[drop] == i).sum())
            if keep == 0:
                raise ValueError(
                    f"global ranking at ratio={ratio} would remove every channel of group {g.index} (layers "
                    f"{g.producers}); lower ratio, set per_layer={{{g.producers[0]!r}: <ratio>}} or pass it "
                    "in "
                    "ignore=[...]"
                )
            keep_count[g.index] = keep
    for g in groups:
        if g.index not in keep_count:
            keep_count[g.index] = g.channels - int(math.floor(ratios[g.index] * g.channels))
        keep = _round_keep(keep_count[g.index], g.channels, round_to, g)
        removed[g.index] = _lowest(scores[g.index], g.channels - keep)

    plans = [
        GroupPlan(
            g.index,
            g.channels,
            g.channels - len(removed.get(g.index, ())),
            removed.get(g.index, torch.empty(0, dtype=torch.long)).tolist(),
            g.modules,
            g.pinned if g.pinned else ([] if g.prunable else ["no layer produces these channels"]),
            notes.get(g.index, ""),
        )
        for g in graph.groups
    ]
    return graph, PruningPlan(importance, plans), removed


def prune_channels(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    ratio: float = 0.5,
    importance: str = "l1",
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    round_to: int = 1,
    per_layer: Mapping[str, float] | None = None,
    ignore: Iterable[str] = (),
    protect_first_last: bool = True,
    global_ranking: bool = False,
    inplace: bool = False,
    dry_run: bool = False,
    seed: int = 0,
    return_plan: bool = False,
) -> nn.Module | PruningPlan | tuple[nn.Module, PruningPlan]:
    """Remove the least important channels of every prunable group and return a smaller dense model.

    Args:
        model: the network; it is traced with torch.fx and run once on ``example_inputs``.
        example_inputs: a tensor or tuple of tensors, the positional arguments of ``model.forward`` (e.g. an
            image batch (N, 3, H, W) or token ids (N, S)). Outputs of the pruned model keep their shapes.
        ratio: fraction of channels removed from each group, in [0, 1) (a conv whose input and output groups
            both lose a fraction p keeps about (1 - p)^2 of its weights).
        importance: "l1" / "l2" (filter norms), "bn_scale" (|BN gamma|), "taylor" (first-order, needs ``data``
            and ``loss_fn``), "fpgm" (geometric median), "thinet" (greedy reconstruction, needs ``data``),
            "random". Coupled layers' filters are concatenated, so a group's score covers all its layers.
        data: iterable of batches, each a tensor or an (inputs, targets) pair; used by taylor and thinet.
        loss_fn: ``loss_fn(output, targets)`` (or ``loss_fn(output)`` for tensor batches), for taylor.
        round_to: kept channel counts are rounded up to a multiple of this (attention heads are not rounded).
        per_layer: ``{layer name: ratio}`` overrides for the groups that layer produces.
        ignore: layer names left untouched: every group they belong to is kept whole.
        protect_first_last: keep the first layer's filters and the last layer's inputs.
        global_ranking: rank channels of all groups together (scores normalised by each group's mean) and
            remove ``ratio`` of all prunable channels; groups may then lose different fractions.
        inplace: prune ``model`` itself instead of a deep copy; if pruning fails, ``model`` is left as it was.
        dry_run: return a :class:`PruningPlan` describing the groups and removals; nothing is changed.
        seed: seed for "random" and for ThiNet's sampling.
        return_plan: also return the PruningPlan of what was removed.

    Returns:
        The pruned model (same class, smaller layers), ``(model, plan)`` with ``return_plan``, or a
        PruningPlan when ``dry_run``.

    Raises:
        TypeError / ValueError for bad arguments; PruningError (a ValueError) for a model that can't be
        traced; UnsupportedPatternError naming the node when an op couples channels in a way this engine
        doesn't model.
    """
    graph, plan, removed = plan_pruning(
        model,
        example_inputs,
        ratio,
        importance,
        data,
        loss_fn,
        round_to,
        per_layer,
        ignore,
        protect_first_last,
        global_ranking,
        seed,
    )
    if dry_run:
        return plan
    args = _as_args(example_inputs)
    with torch.no_grad():
        was_training = model.training
        expected = _shapes(model.eval()(*args))
        model.train(was_training)
    if not inplace:
        target = copy_of(model)
        _slice_and_check(target, graph, removed, args, expected)
        return (target, plan) if return_plan else target
    saved = _snapshot(model)
    try:
        _slice_and_check(model, graph, removed, args, expected)
    except BaseException:
        _restore(saved)
        raise
    return (model, plan) if return_plan else model


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Every module's attributes: slicing replaces tensors, submodules and sizes, never edits a tensor."""
    tables = ("_parameters", "_buffers", "_modules")
    return [(m, {k: copy.copy(v) if k in tables else v for k, v in vars(m).items()}) for m in model.modules()]


def _restore(saved: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for m, attrs in saved:
        vars(m).clear()
        vars(m).update(attrs)


def _slice_and_check(
    target: nn.Module, graph: DependencyGraph, removed: dict[int, torch.Tensor], args: tuple, expected: Any
) -> None:
    slice_model(target, graph.groups, removed)
    with torch.no_grad():
        was_training = target.training
        try:
            got = _shapes(target.eval()(*args))
        except Exception as exc:
            raise PruningError(
                f"internal error: the pruned model fails on example_inputs ({exc}); please report "
                "it with the model, or pass the failing layer in ignore=[...]"
            ) from exc
        finally:
            target.train(was_training)
    if got != expected:
        raise PruningError(f"internal error: pruned model output shapes {got} differ from {expected}")


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return [_shapes(o) for o in out]
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    return out
