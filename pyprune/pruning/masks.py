"""Weight masks: unstructured magnitude (layer-wise or global), N:M and block sparsity, fixed through
fine-tuning.

A mask is a ``torch.nn.utils.parametrize`` parametrization ``weight = original * mask``; the mask is a buffer,
so masked weights stay zero (their gradient through the product is zero) until the mask is recomputed, which
only an attached :class:`CubicSchedule` does.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..sparse.select import (
    as_2d,
    block_mask,
    block_scores,
    check_sparsity,
    expand_blocks,
    lowest_k,
    magnitude_mask,
    nm_mask,
)


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask``. mask: bool, same shape as the weight."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def _parse_pattern(pattern: str) -> tuple[str, int, int]:
    if pattern in ("unstructured", "block"):
        return pattern, 0, 0
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise ValueError(f"pattern must be 'unstructured', 'block' or 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n <= m:
        raise ValueError(f"N:M pattern needs 0 < N <= M, got {pattern!r}")
    return "nm", n, m


class CubicSchedule:
    """Gradual pruning schedule of Zhu & Gupta 2017: sparsity rises from ``initial_sparsity`` to the final
    one as

        s_t = s_f + (s_i - s_f) * (1 - (t - begin_step) / (end_step - begin_step)) ** 3

    and masks are recomputed every ``frequency`` steps between ``begin_step`` and ``end_step``. Pass it to
    ``sparsify(..., schedule=...)``, which sets the final sparsity, then call :meth:`step` once per
    training step.
    """

    def __init__(
        self, begin_step: int = 0, end_step: int = 1000, frequency: int = 100, initial_sparsity: float = 0.0
    ) -> None:
        if not 0 <= begin_step < end_step:
            raise ValueError(f"CubicSchedule needs 0 <= begin_step < end_step, got {begin_step}, {end_step}")
        if frequency < 1:
            raise ValueError(f"CubicSchedule frequency must be >= 1, got {frequency}")
        check_sparsity(initial_sparsity, name="initial_sparsity")
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.initial_sparsity = initial_sparsity
        self.final_sparsity: float | None = None
        self.current_step = 0
        self._apply: Callable[[float], None] | None = None

    def sparsity_at(self, step: int) -> float:
        if self.final_sparsity is None:
            raise RuntimeError(
                "CubicSchedule is not attached: pass it to pyprune.sparsify(..., schedule=...)"
            )
        t = min(max(step, self.begin_step), self.end_step)
        frac = (t - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def step(self) -> float:
        """Advance one training step; recompute the masks on update steps. Returns the target sparsity."""
        if self._apply is None:
            raise RuntimeError(
                "CubicSchedule is not attached: pass it to pyprune.sparsify(..., schedule=...)"
            )
        self.current_step += 1
        t = self.current_step
        if self.begin_step <= t <= self.end_step and (
            (t - self.begin_step) % self.frequency == 0 or t == self.end_step
        ):
            self._apply(self.sparsity_at(t))
        return self.sparsity_at(t)

    def _attach(self, final_sparsity: float, apply: Callable[[float], None]) -> None:
        if self._apply is not None:  # a second model would silently take over the steps
            raise ValueError(
                "schedule: this CubicSchedule already drives another sparsify call (use one per model)"
            )
        if self.initial_sparsity > final_sparsity:
            raise ValueError(
                f"schedule: initial_sparsity ({self.initial_sparsity}) must not exceed the final sparsity "
                f"({final_sparsity}); masks only grow"
            )
        self.final_sparsity, self._apply = final_sparsity, apply
        apply(self.sparsity_at(0))


def _targets(model: nn.Module, types: tuple[type, ...], ignore: Iterable[str]) -> dict[str, nn.Module]:
    ignore = {ignore} if isinstance(ignore, str) else set(ignore)
    known = {n for n, _ in model.named_modules()}
    for n in ignore:
        if n not in known:
            raise ValueError(f"ignore: model has no layer named {n!r}")
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, types) and n not in ignore and not any(n.startswith(i + ".") for i in ignore)
    }


def _check_block(block: object) -> tuple[int, int]:
    pair = (block, block) if isinstance(block, int) else block
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or any(isinstance(b, bool) or not isinstance(b, int) for b in pair)
    ):
        raise TypeError(f"block must be an int or a (bh, bw) pair of ints, got {block!r}")
    if min(pair) < 1:
        raise ValueError(f"block must be (bh, bw) with positive sizes, got {block!r}")
    return tuple(pair)


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The bool mask on ``module.weight`` set by sparsify, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, WeightMask):
            return p.mask
    return None


def _stored_weight(module: nn.Module) -> torch.Tensor:
    """The weight Parameter itself (under a mask's parametrization, the original), whose identity tells tied
    weights apart."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    current = get_mask(module)
    if current is not None:
        current.copy_(mask)
    else:
        parametrize.register_parametrization(module, "weight", WeightMask(mask))


def sparsify(
    model: nn.Module,
    sparsity: float = 0.9,
    pattern: str = "unstructured",
    scope: str = "layer",
    block: int | tuple[int, int] = (32, 32),
    schedule: CubicSchedule | None = None,
    ignore: Iterable[str] = (),
    types: tuple[type, ...] = (nn.Linear, nn.Conv2d),
    inplace: bool = False,
) -> nn.Module:
    """Mask the weights of every Linear / Conv2d (``types``) not in ``ignore``; returns the masked model.

    Args:
        sparsity: fraction of weights (unstructured) or tiles (block) zeroed, in [0, 1]; exact per layer for
            scope="layer", exact over all targeted weights for scope="global". Not used by N:M patterns, whose
            density is N/M.
        pattern: "unstructured" (smallest |w|), "block" (tiles of ``block`` = (bh, bw), or an int for square
            tiles, with the smallest L2 norm; the 2-D weight (O, C*kh*kw) must be tiled exactly) or "N:M" such
            as "2:4" (N largest of every M consecutive input weights; the input dim must be a multiple of M).
        scope: "layer" (each layer its own threshold) or "global" (one threshold over all targeted weights).
        schedule: a :class:`CubicSchedule`; masks start at its initial sparsity and reach ``sparsity`` as the
            user calls ``schedule.step()`` (unstructured and block patterns only).
        inplace: mask ``model`` itself instead of a deep copy.

    A layer masked before keeps its zeros: its new mask is the old one and the new selection together, so
    calling sparsify again prunes further and never brings weights back (use remove_masks, or the unmasked
    model, to start over).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kind, n, m = _parse_pattern(pattern)
    if kind != "nm":
        check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if kind == "block":
        block = _check_block(block)
    if schedule is not None and kind == "nm":
        raise ValueError(
            "schedule= works with pattern='unstructured' or 'block'; an N:M pattern has a fixed density"
        )
    if schedule is not None and not isinstance(schedule, CubicSchedule):
        raise TypeError(f"schedule must be a pyprune CubicSchedule, got {type(schedule).__name__}")
    if isinstance(types, type):
        types = (types,)
    target = model if inplace else copy_of(model)
    layers = _targets(target, types, ignore)
    if not layers:
        raise ValueError(f"sparsify found no {[t.__name__ for t in types]} layers to mask outside ignore")
    bad = []
    for name, layer in layers.items():
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            raise ValueError(f"types: layer {name!r} ({type(layer).__name__}) has no weight tensor to mask")
        w2 = as_2d(layer.weight)
        if kind == "nm" and w2.shape[1] % m:
            bad.append(f"{name} (input dim {w2.shape[1]} not a multiple of {m})")
        if kind == "block" and (w2.shape[0] % block[0] or w2.shape[1] % block[1]):
            bad.append(f"{name} (weight {tuple(w2.shape)} not tiled by {tuple(block)})")
    if bad:
        raise ValueError(
            f"pattern={pattern!r} can't be applied to: {', '.join(bad)}; pass these names in "
            "ignore=[...]" + (" or choose a smaller block" if kind == "block" else "")
        )

    def apply(s: float) -> None:
        with torch.no_grad():
            weights = {name: layer.weight.detach() for name, layer in layers.items()}  # masked if masked
            if kind == "nm":
                masks = {name: nm_mask(w, n, m) for name, w in weights.items()}
            elif scope == "layer":
                masks = {
                    name: (magnitude_mask(w, s) if kind == "unstructured" else block_mask(w, s, block))
                    for name, w in weights.items()
                }
            else:
                # a weight tied between layers is ranked once, and its layers share its mask
                first = {}
                for name, layer in layers.items():
                    first.setdefault(id(_stored_weight(layer)), name)
                score = (lambda w: w.abs()) if kind == "unstructured" else (lambda w: block_scores(w, block))
                scores = {name: score(weights[name]) for name in first.values()}
                flat = torch.cat([sc.reshape(-1) for sc in scores.values()])
                keep = lowest_k(flat, round(s * flat.numel()))
                shared, start = {}, 0
                for name, sc in scores.items():
                    k = keep[start : start + sc.numel()].reshape(sc.shape)
                    start += sc.numel()
                    shared[name] = (
                        k if kind == "unstructured" else expand_blocks(k, block, weights[name].shape)
                    )
                masks = {name: shared[first[id(_stored_weight(layer))]] for name, layer in layers.items()}
            for name, mask in masks.items():
                old = get_mask(layers[name])  # an earlier mask's zeros stay: sparsify only prunes further
                _set_mask(layers[name], mask if old is None else mask & old)

    if schedule is not None:
        schedule._attach(float(sparsity), apply)
    else:
        apply(float(sparsity) if kind != "nm" else 1.0 - n / m)
    return target


def mask_density(model: nn.Module) -> dict[str, float]:
    """Fraction of kept weights of every masked layer."""
    return {
        name: float(mk.float().mean())
        for name, mod in model.named_modules()
        if (mk := get_mask(mod)) is not None
    }


def copy_of(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``; a model holding torch.nn.utils.prune masks (whose weight is computed, so
    deepcopy refuses it) gets a message that says what to do."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as exc:
        for name, m in model.named_modules():
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, torch.nn.utils.prune.BasePruningMethod):
                    t = hook._tensor_name
                    raise ValueError(
                        f"model: layer {name!r} holds a torch.nn.utils.prune mask on {t!r}, and such a "
                        f"model cannot be copied ({exc}); call torch.nn.utils.prune.remove(layer, {t!r}) on "
                        "its layers first (the zeros stay), or mask with pyprune.sparsify"
                    ) from exc
        raise


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake masks into plain weights (zeros stay zeros) and drop the parametrizations, in place."""
    for mod in model.modules():
        if get_mask(mod) is not None:
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return model


__all__ = [
    "CubicSchedule",
    "WeightMask",
    "block_mask",
    "block_scores",
    "copy_of",
    "get_mask",
    "mask_density",
    "nm_mask",
    "remove_masks",
    "sparsify",
    "magnitude_mask",
]
