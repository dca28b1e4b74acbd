"""``pyprune.compare``: time structured and unstructured pruning of one model side by side, on this machine.

Variants per level, all timed in the same run with the same inputs (see :mod:`.timing`):

- ``dense``: the model as given (once, the baseline);
- ``masked``: ``sparsify(pattern="unstructured")`` run as is: the zeros are there, the speed is not (the mask is
  applied on every forward, as with torch.nn.utils.prune);
- ``channel``: ``prune_channels`` (L1) at the ratio whose kept Linear/Conv2d weights best match the unstructured
  level, i.e. prunable_params(channel) ~= (1 - level) * prunable_params(dense), found by bisection on the ratio.
  When the engine cannot shrink that far (protected first/last layers, attention heads), the closest reachable
  model is used and the note says what fraction was kept;
- ``csr``: the masked model converted with ``convert(layout="csr")``; ``bsr``: ``sparsify(pattern="block")`` of
  the Linear layers whose shape tiles by ``block``, converted to BSR; ``2:4``: ``sparsify(pattern="2:4")`` then
  ``convert(layout="2:4")``, only at level 0.5. Convolutions are not converted (no sparse conv module yet): in
  csr rows their masks are baked into plain dense weights.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..flops import count_flops, count_params
from ..pruning import convert, prune_channels, remove_masks, sparsify
from .report import Report, environment
from .timing import fixed_threads, summarize, time_interleaved

METHODS = ("dense", "masked", "channel", "csr", "bsr", "2:4")

__all__ = ["METHODS", "Report", "compare"]


class NotApplicable(Exception):
    """A variant that does not apply to this model; the row says why instead of crashing."""


def _args(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _prunable_weights(model: nn.Module) -> int:
    """Weight elements of the Linear / Conv2d layers (what sparsify masks); masked weights count in full."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def _kept_weights(model: nn.Module) -> int:
    """Nonzero weights of Linear / Conv2d layers plus the stored values of sparse modules."""
    from ..nn import SparseLinear

    n = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n += int(torch.count_nonzero(m.weight.detach()))
        elif isinstance(m, SparseLinear):
            n += int(torch.count_nonzero(m.weight.values))
    return n


def _executed_flops(model: nn.Module, args: tuple) -> int:
    """count_flops (aten ops) plus 2 * stored values * rows for each SparseLinear, whose custom ops the flop
    counter does not see (BSR blocks and 2:4 groups count their explicit zeros: that work is done)."""
    from ..nn import SparseLinear

    extra = [0]

    def hook(mod, inp, out):
        extra[0] += 2 * mod.weight.nnz * (inp[0].numel() // mod.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SparseLinear)]
    try:
        flops = count_flops(model, args)
    finally:
        for h in handles:
            h.remove()
    return flops + extra[0]


def _match_channel_ratio(model, args, level, dense_w, steps: int = 8):
    """Bisection on prune_channels' ratio so that prunable weights ~= (1 - level) * dense."""
    target = (1.0 - level) * dense_w
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        m = prune_channels(model, args, ratio=mid)
        w = _prunable_weights(m)
        if best is None or abs(w - target) < abs(best[2] - target):
            best = (mid, m, w)
        if w > target:
            lo = mid
        else:
            hi = mid
    if best[2] > target:  # the top of the range may reach lower than the bisection visited
        m = prune_channels(model, args, ratio=hi)
        w = _prunable_weights(m)
        if abs(w - target) < abs(best[2] - target):
            best = (hi, m, w)
    return best


def _linear_names(model, ok: Callable[[nn.Linear], bool]) -> tuple[list[str], list[str]]:
    good, bad = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            (good if ok(m) else bad).append(name)
    return good, bad


def _build(
    method: str, level: float | None, model: nn.Module, args: tuple, block: tuple[int, int]
) -> tuple[nn.Module, str]:
    if method == "dense":
        return model, ""
    if method == "masked":
        return sparsify(model, level, pattern="unstructured"), ""
    if method == "csr":
        # a fresh masked copy (same magnitudes, same mask): removing parametrizations from a deep copy of a
        # parametrized model also strips the original's
        out, rep = convert(
            sparsify(model, level, pattern="unstructured"), layout="csr", inplace=True, return_report=True
        )
        remove_masks(out)
        note = f"{len(rep.converted)} linear -> csr"
        if rep.left_dense:
            note += f", {len(rep.left_dense)} left dense"
        return out, note
    if method == "channel":
        dense_w = _prunable_weights(model)
        ratio, m, w = _match_channel_ratio(model, args, level, dense_w)
        note = f"ratio {ratio:.3f}"
        if abs(w / dense_w - (1 - level)) > 0.05:
            note += f"; kept {1 - level:.2f} not reachable"
        return m, note
    if method in ("bsr", "2:4"):
        bh, bw = block
        if method == "bsr":
            good, bad = _linear_names(
                model, lambda lin: lin.out_features % bh == 0 and lin.in_features % bw == 0
            )
            kw = dict(pattern="block", block=block)
        else:
            good, bad = _linear_names(model, lambda lin: lin.in_features % 4 == 0)
            kw = dict(pattern="2:4")
        if not good:
            why = (
                f"no Linear layer tiles by {block}" if method == "bsr" else "no Linear layer with in % 4 == 0"
            )
            raise NotApplicable(why)
        masked = sparsify(model, level, types=(nn.Linear,), ignore=bad, **kw)
        out = convert(masked, layout=method, block=block)
        note = f"{len(good)} linear -> {method}"
        if bad:
            note += f", {len(bad)} dense"
        return out, note
    raise ValueError(f"unknown method {method!r}")


def _check(methods, levels, rounds, threads, device):
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods: unknown {bad}; valid methods are {list(METHODS)}")
    levels = tuple(float(x) for x in levels)
    for x in levels:
        if not (0.0 < x < 1.0) or math.isnan(x):
            raise ValueError(f"levels must lie in the open interval (0, 1), got {x}")
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    if torch.device(device).type != "cpu":
        raise ValueError(f"device: only 'cpu' is supported by this version of compare, got {device!r}")
    return methods, levels


def compare(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    methods: Iterable[str] = METHODS,
    levels: Iterable[float] = (0.5, 0.75, 0.9),
    device: str = "cpu",
    threads: int | None = None,
    rounds: int = 7,
    budget_s: float = 30.0,
    block: tuple[int, int] = (32, 32),
    name: str | None = None,
    seed: int = 0,
) -> Report:
    """Time dense, masked, channel-pruned and sparse-converted variants of ``model`` in one interleaved run.

    Args:
        model: the network (put in eval mode; not modified: every variant is a copy).
        example_inputs: a tensor or tuple of tensors, the positional arguments of ``model.forward``; every
            variant runs on these same tensors.
        methods: a subset of ``METHODS``; "dense" is always timed as the baseline. Levels are sparsities in
            (0, 1): the fraction of Linear/Conv2d weights removed (channel: matched by parameter count).
        threads: torch threads for the whole comparison (default: the current setting); restored afterwards.
        rounds: interleaved rounds (each times every variant once, in a shuffled order).
        budget_s: time budget for the timing rounds; after at least 2 rounds, rounds stop once it is spent.
        block: BSR tile (bh, bw).
    Returns:
        a :class:`Report`; rows that do not apply carry ``median_s=None`` and a note saying why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    methods, levels = _check(methods, levels, rounds, threads, device)
    args = _args(example_inputs)
    model = copy.deepcopy(model).eval()
    with fixed_threads(threads) as nthreads, torch.no_grad():
        variants: list[tuple[str, float | None]] = [("dense", None)]
        for lv in levels:
            for m in methods:
                if m == "dense" or (m == "2:4" and not math.isclose(lv, 0.5)):
                    continue
                variants.append((m, lv))
        built, rows = {}, []
        for key in variants:
            try:
                mod, note = _build(key[0], key[1], model, args, block)
            except NotApplicable as exc:
                rows.append({"method": key[0], "level": key[1], "median_s": None, "note": f"n/a: {exc}"})
                continue
            mod.eval()
            built[key] = (mod, note)
        fns = {key: (lambda m=mod: m(*args)) for key, (mod, _) in built.items()}
        samples = time_interleaved(
            {f"{m}@{lv}": fn for (m, lv), fn in fns.items()}, int(rounds), nthreads, budget_s, seed=seed
        )
        dense_t = samples["dense@None"]
        dense_w = _prunable_weights(model)
        for (m, lv), (mod, note) in built.items():
            ts = samples[f"{m}@{lv}"]
            row = {
                "method": m,
                "level": lv,
                **summarize(ts, dense_t),
                "params": count_params(mod),
                "flops": _executed_flops(mod, args),
                "prunable_kept": _kept_weights(mod) / dense_w,
                "times_s": ts,
                "note": note,
            }
            rows.append(row)
    order = {key: i for i, key in enumerate(variants)}
    rows.sort(key=lambda r: order[(r["method"], r["level"])])
    return Report(rows=rows, environment=environment(nthreads, "cpu"), model=name or type(model).__name__)
