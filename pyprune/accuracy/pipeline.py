"""``pyprune.pipeline``: prune -> fine-tune (-> distill) -> low-rank -> int8 on real data, measuring accuracy,
parameters, FLOPs and latency after every stage.

Stages are :class:`Prune`, :class:`FineTune`, :class:`LowRank` and :class:`Int8` objects, or the strings
"prune", "finetune", "distill", "lowrank", "int8" for their defaults. Latency is measured, never derived from
FLOPs: all stage outputs are timed in one interleaved run (``pyprune.compare.timing``) on the same batch,
with a fixed thread count, and speedup is the median of same-round ratios against the input model.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..compare.timing import fixed_threads, summarize, time_interleaved
from ..flops import count_flops, count_params
from ..pruning import IMPORTANCE, build_graph, convert, prune_channels, prune_layers, sparsify
from ..pruning.layers import residual_blocks
from ..pruning.masks import get_mask
from .data import check_loader
from .lowrank import lowrank
from .quant import is_quantized, quantize_int8
from .train import evaluate, train

STRUCTURED = (*IMPORTANCE, "layer", "slimming")
UNSTRUCTURED = ("magnitude", "csr", "2:4", "block")
METHODS = STRUCTURED + UNSTRUCTURED


class NotApplicable(ValueError):
    """The method cannot be applied to this model (e.g. slimming without BatchNorm); the message says why."""


@dataclass
class FineTune:
    """Train ``epochs`` epochs (Adam, cosine decay). ``distill``: soft + hard labels from the teacher
    (Hinton et al. 2015, ``alpha`` weight of the soft term at ``temperature``)."""

    epochs: int = 5
    lr: float = 1e-3
    distill: bool = False
    alpha: float = 0.5
    temperature: float = 4.0

    @property
    def name(self) -> str:
        return f"{'distill' if self.distill else 'finetune'}({self.epochs})"


@dataclass
class Prune:
    """Prune to ``level`` with ``method``.

    Structured methods (l1, l2, bn_scale, taylor, fpgm, thinet, random: channel criteria; "layer": whole
    residual blocks; "slimming": ``slim_epochs`` of training with an L1 penalty on BN scales, then bn_scale)
    remove ``level`` of the model's FLOPs (count_flops), matched by searching the channel ratio. Unstructured
    methods zero ``level`` of every Linear / Conv2d weight ("magnitude": kept as dense weights with zeros;
    "csr": Linear and Conv2d layers converted to pyprune's CSR kernels (SparseLinear / SparseConv2d);
    "block": ``block`` tiles, converted to BSR; "2:4": fixed 50%, converted to the 2:4 kernel; layers whose
    shape does not fit the pattern stay dense). ``steps > 1`` prunes iteratively: ``steps`` increments of the level with ``between``
    fine-tuning after each but the last.
    """

    method: str = "l1"
    level: float = 0.5
    steps: int = 1
    between: FineTune | None = None
    block: tuple[int, int] = (2, 2)
    slim_epochs: int = 3
    slim_l1: float = 1e-4
    importance_batches: int = 4

    @property
    def name(self) -> str:
        it = f" x{self.steps}" if self.steps > 1 else ""
        return f"prune({self.method}@{self.level:g}{it})"


@dataclass
class LowRank:
    """Factorise Linear (SVD) and Conv2d (Tucker-2, or CP) layers; see :func:`pyprune.accuracy.lowrank`."""

    energy: float = 0.9
    method: str = "tucker"
    rank_by: str = "energy"
    min_speedup: float = 1.05

    @property
    def name(self) -> str:
        by = f"{self.energy:g}" if self.rank_by == "energy" else "latency"
        return f"lowrank({self.method}, {by})"


@dataclass
class Int8:
    """Post-training int8 (torch.ao.quantization, x86 backend): "auto" = FX static, else dynamic."""

    mode: str = "auto"
    calibration_batches: int = 8

    @property
    def name(self) -> str:
        return "int8"


Stage = Prune | FineTune | LowRank | Int8
_STAGE_NAMES = {
    "prune": Prune,
    "finetune": FineTune,
    "distill": lambda: FineTune(distill=True),
    "lowrank": LowRank,
    "int8": Int8,
}


def parse_stages(stages: Sequence[Stage | str]) -> list[Stage]:
    """Turn names into stage objects and reject orders that make no sense (anything after int8; pruning after
    low-rank; low-rank after unstructured pruning, which would fill the zeros back in)."""
    if isinstance(stages, (str, Prune, FineTune, LowRank, Int8)) or not isinstance(stages, Sequence):
        raise TypeError(
            f"stages must be a list of stages, e.g. ['prune', 'finetune', 'int8'], got {stages!r}"
        )
    if not stages:
        raise ValueError(
            "stages is empty: give at least one of 'prune', 'finetune', 'distill', 'lowrank', 'int8'"
        )
    out: list[Stage] = []
    for s in stages:
        if isinstance(s, str):
            if s not in _STAGE_NAMES:
                raise ValueError(f"stages: unknown stage {s!r}; valid names are {list(_STAGE_NAMES)}")
            s = _STAGE_NAMES[s]()
        if not isinstance(s, (Prune, FineTune, LowRank, Int8)):
            raise TypeError(f"stages: {s!r} is not a stage (Prune, FineTune, LowRank, Int8 or a name)")
        out.append(s)
    seen_int8 = seen_lowrank = seen_unstructured = False
    for i, s in enumerate(out):
        if seen_int8:
            raise ValueError(
                f"stages: {s.name} after int8 makes no sense (a quantized model cannot be pruned, fine-tuned or "
                "factorised); put int8 last, e.g. ['prune', 'finetune', 'lowrank', 'int8']"
            )
        if isinstance(s, Prune):
            _check_prune(s)
            if seen_lowrank:
                raise ValueError(f"stages: {s.name} after lowrank is not supported; prune before lowrank")
            seen_unstructured |= s.method in UNSTRUCTURED
        if isinstance(s, LowRank):
            if seen_unstructured:
                raise ValueError(
                    "stages: lowrank after unstructured pruning would fill the pruned zeros back in; use a "
                    "structured method (l1, taylor, ...) before lowrank"
                )
            seen_lowrank = True
        if isinstance(s, FineTune) and (
            isinstance(s.epochs, bool) or not isinstance(s.epochs, int) or s.epochs < 0
        ):
            raise ValueError(f"FineTune.epochs must be an int >= 0, got {s.epochs!r}")
        seen_int8 |= isinstance(s, Int8)
    return out


def _check_prune(p: Prune) -> None:
    if p.method not in METHODS:
        raise ValueError(f"Prune.method must be one of {list(METHODS)}, got {p.method!r}")
    lv = p.level
    if isinstance(lv, bool) or not isinstance(lv, (int, float)) or math.isnan(lv) or not 0.0 < lv < 1.0:
        raise ValueError(
            f"Prune.level must be in (0, 1) (the fraction of FLOPs / weights removed; 1 would remove every "
            f"channel), got {lv!r}"
        )
    if p.method == "2:4" and not math.isclose(lv, 0.5):
        raise ValueError(f"Prune(method='2:4') has a fixed sparsity of 0.5; level must be 0.5, got {lv!r}")
    if isinstance(p.steps, bool) or not isinstance(p.steps, int) or p.steps < 1:
        raise ValueError(f"Prune.steps must be an int >= 1, got {p.steps!r}")
    if p.method == "2:4" and p.steps > 1:
        raise ValueError("Prune(method='2:4') cannot be iterative (steps=1): its density is fixed")
    b = p.block
    if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(type(v) is int and v >= 1 for v in b)):
        raise ValueError(f"Prune.block must be a (bh, bw) pair of ints >= 1, got {b!r}")


def check_time_batch(time_batch: object) -> None:
    """A negative slice would drop samples from the end, 0 time an empty batch."""
    if isinstance(time_batch, bool) or not isinstance(time_batch, int) or time_batch < 1:
        raise ValueError(f"time_batch must be an int >= 1 (samples in the timed batch), got {time_batch!r}")


# ----------------------------------------------------------------------------------------------- measuring


def _nnz(weight: object) -> int | None:
    if isinstance(weight, torch.Tensor):
        return int(torch.count_nonzero(weight.detach()))
    values = getattr(weight, "values", None)  # pyprune.sparse formats (CSR, BSR, Sparse24) keep their values
    if isinstance(values, torch.Tensor):
        return int(torch.count_nonzero(values.detach()))
    return None


def effective_flops(model: nn.Module, example_inputs: torch.Tensor | tuple) -> int:
    """FLOPs of the weighted layers counting only nonzero weights: 2 * nnz(W) per output position, for
    nn.Linear / nn.Conv2d (masked or not) and pyprune's SparseLinear / SparseConv2d / PrunedConv2d; norms and
    embeddings, which also hold a ``weight``, do no multiply-adds with it. For an unpruned conv / linear model
    this equals count_flops."""
    from ..nn import PrunedConv2d, SparseConv2d, SparseLinear

    convs = (nn.Conv2d, SparseConv2d, PrunedConv2d)
    total = [0]

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nnz = _nnz(mod.weight)
        if nnz is None or not isinstance(out, torch.Tensor) or out.dim() < 2:
            return
        # a conv's output channels are dim 1; a linear's the last dim, whatever the input's rank
        per_out = out.numel() // (out.shape[1] if isinstance(mod, convs) else out.shape[-1])
        total[0] += 2 * nnz * per_out

    mods = [m for m in model.modules() if isinstance(m, (nn.Linear, SparseLinear, *convs))]
    handles = [m.register_forward_hook(hook) for m in mods]
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(*args)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total[0]


def measure_latency(
    models: dict[str, nn.Module],
    example_inputs: torch.Tensor | tuple,
    baseline: str,
    threads: int | None = 1,
    rounds: int = 7,
    budget_s: float = 20.0,
    seed: int = 0,
) -> dict[str, dict]:
    """Time every model on the same inputs in one interleaved run; per model: median_s, p10_s, p90_s, noisy,
    speedup (median over rounds of time(baseline) / time(model), measured, not a FLOP ratio), times_s."""
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {list(models)}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for m in models.values():
        m.eval()
    fns = {k: (lambda m=m: m(*args)) for k, m in models.items()}
    with fixed_threads(threads) as nt:
        samples = time_interleaved(fns, rounds, nt, budget_s, seed=seed)
    return {k: {**summarize(samples[k], samples[baseline]), "times_s": samples[k]} for k in models}


# ------------------------------------------------------------------------------------------------- pruning


def _flops(model: nn.Module, args: tuple) -> int:
    return count_flops(model, args)


def match_flops_ratio(
    model: nn.Module, args: tuple, level: float, steps: int = 12, **prune_kwargs
) -> tuple[float, float]:
    """The smallest channel ratio at which ``prune_channels`` removes at least ``level`` of the FLOPs
    (bisection; channel counts do not depend on the criterion, so l1 is used to search). Returns (ratio,
    FLOPs fraction removed). Raises ValueError if even keeping one channel per group removes less."""
    dense = _flops(model, args)
    kw = dict(prune_kwargs, importance="l1")

    def removed(r: float) -> float:
        return 1.0 - _flops(prune_channels(model, args, ratio=r, **kw), args) / dense

    top = 0.999
    most = removed(top)
    if most < level:
        raise ValueError(
            f"level={level:g} would remove every channel of some group: channel pruning of this model removes "
            f"at most {most:.1%} of its FLOPs (the first/last layers and non-prunable groups stay); lower level"
        )
    lo, hi, best = 0.0, top, (top, most)
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = removed(mid)
        if got >= level:
            hi, best = mid, (mid, got)
        else:
            lo = mid
    return best


def match_flops(
    model: nn.Module, args: tuple, level: float, refine_steps: int = 5, **prune_kwargs
) -> tuple[float, dict[str, float], float]:
    """Like :func:`match_flops_ratio`, then, because one uniform ratio moves in coarse steps on narrow layers
    (LeNet's 6-channel conv1), each group's ratio is lowered in turn (bisection, ``refine_steps``) as long as
    at least ``level`` of the FLOPs stays removed. Returns (ratio, per_layer overrides, fraction removed).

    Channel counts, hence FLOPs, depend on the architecture only, so results are cached by parameter shapes.
    """
    key = (
        type(model).__name__,
        tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
        tuple(tuple(a.shape) for a in args),
        round(level, 9),
        refine_steps,
        tuple(sorted(prune_kwargs.items())),
    )
    if key not in _MATCH_CACHE:
        _MATCH_CACHE[key] = _match_flops(model, args, level, refine_steps, **prune_kwargs)
    ratio, per_layer, got = _MATCH_CACHE[key]
    return ratio, dict(per_layer), got


_MATCH_CACHE: dict[tuple, tuple[float, dict[str, float], float]] = {}


def _match_flops(model, args, level, refine_steps, **prune_kwargs):
    ratio, got = match_flops_ratio(model, args, level, **prune_kwargs)
    dense = _flops(model, args)
    kw = dict(prune_kwargs, importance="l1")
    graph = build_graph(model, args)
    producers = [g.producers[0] for g in graph.groups if g.prunable and g.producers]
    per_layer: dict[str, float] = {}

    def removed(pl: dict[str, float]) -> float:
        return 1.0 - _flops(prune_channels(model, args, ratio=ratio, per_layer=pl, **kw), args) / dense

    for name in producers:
        lo, hi = 0.0, ratio
        for _ in range(refine_steps):
            mid = (lo + hi) / 2
            r = removed({**per_layer, name: mid})
            if r >= level:
                hi, got = mid, r
            else:
                lo = mid
        if hi < ratio:
            per_layer[name] = hi
    return ratio, per_layer, got


def _loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _prune_once(
    model: nn.Module, p: Prune, level: float, args: tuple, train_data: Iterable, dense_flops: int
) -> tuple[nn.Module, str]:
    """One pruning step to ``level`` (of the ORIGINAL model's FLOPs / of the weights). Returns (model, note)."""
    m = p.method
    if m in IMPORTANCE or m == "slimming":
        importance = m
        note = ""
        if m == "slimming":
            if not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in model.modules()):
                raise NotApplicable(
                    "slimming needs BatchNorm layers (it prunes by |BN gamma|); this model has none"
                )
            model = copy.deepcopy(model)
            train(model, train_data, p.slim_epochs, lr=1e-3, bn_l1=p.slim_l1, description="slimming")
            importance = "bn_scale"
            note = f"{p.slim_epochs} ep L1(gamma)={p.slim_l1:g}; "
        # the level is relative to the original model: remove this model's share of what is left
        now = _flops(model, args)
        rel = 1.0 - (1.0 - level) * dense_flops / now
        if rel <= 0:
            return model, note + "already below the FLOP target"
        kw = {"protect_first_last": False}
        ratio, per_layer, _ = match_flops(model, args, rel, **kw)
        data = list(itertools.islice(iter(train_data), p.importance_batches))
        pruned, plan = prune_channels(
            model,
            args,
            ratio=ratio,
            per_layer=per_layer,
            importance=importance,
            data=data,
            loss_fn=_loss_fn,
            return_plan=True,
            **kw,
        )
        notes = sorted({g.note for g in plan.groups if g.note})
        over = f" ({', '.join(f'{k} {v:.2f}' for k, v in per_layer.items())})" if per_layer else ""
        return pruned, note + f"ratio {ratio:.3f}{over}" + (f"; {notes[0]}" if notes else "")
    if m == "layer":
        names = residual_blocks(model)
        if not names:
            raise NotApplicable("layer pruning needs residual blocks (input + f(input)); this model has none")
        now = _flops(model, args)
        best = None
        for n in range(len(names) + 1):
            cand = prune_layers(model, n=n, importance="residual_norm", example_inputs=args)
            got = 1.0 - _flops(cand, args) / dense_flops
            if best is None or abs(got - level) < abs(best[2] - level):
                best = (n, cand, got)
        n, cand, got = best
        del now
        return cand, f"{n}/{len(names)} blocks removed"
    # unstructured
    ignore, note = _pattern_ignores(model, p)
    kw: dict = {"types": (nn.Linear, nn.Conv2d), "ignore": ignore}
    if m in ("magnitude", "csr"):
        masked = sparsify(model, level, pattern="unstructured", **kw)
    elif m == "2:4":
        masked = sparsify(model, 0.5, pattern="2:4", **kw)
    else:
        masked = sparsify(model, level, pattern="block", block=tuple(p.block), **kw)
    return masked, note


def _pattern_ignores(model: nn.Module, p: Prune) -> tuple[list[str], str]:
    layers = {n: x for n, x in model.named_modules() if isinstance(x, (nn.Linear, nn.Conv2d))}
    bad = []
    for n, x in layers.items():
        w2 = x.weight.reshape(x.weight.shape[0], -1)
        if p.method == "2:4" and w2.shape[1] % 4:
            bad.append(n)
        if p.method == "block" and (w2.shape[0] % p.block[0] or w2.shape[1] % p.block[1]):
            bad.append(n)
    if len(bad) == len(layers):
        raise NotApplicable(f"no Linear/Conv2d layer fits the {p.method} pattern")
    return bad, (f"dense (shape does not fit): {', '.join(bad)}" if bad else "")


def bake_masks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose masked weights are plain parameters holding the masked values.

    Not ``torch.nn.utils.parametrize.remove_parametrizations`` on a deep copy: the copy shares its
    parametrized class with the original, and removing the last parametrization deletes the ``weight``
    property from that shared class, breaking the original.
    """
    out = copy.deepcopy(model)
    for mod in out.modules():
        if not parametrize.is_parametrized(mod):
            continue
        values = {name: getattr(mod, name).detach().clone() for name in list(mod.parametrizations.keys())}
        mod.__class__ = type(mod).__bases__[
            0
        ]  # the class parametrize derived from; the shared one is untouched
        del mod.parametrizations
        for name, v in values.items():
            mod.register_parameter(name, nn.Parameter(v))
    return out


def _finalize_unstructured(model: nn.Module, method: str, block: tuple[int, int]) -> tuple[nn.Module, str]:
    """Deployable copy of a masked model: sparse kernels for Linear and Conv2d layers (csr / 2:4 / block->bsr;
    pyprune.convert), masks baked into plain dense weights for everything else."""
    if method == "magnitude":
        return bake_masks(model), "dense kernels, zeros stored"
    layout = {"csr": "csr", "2:4": "2:4", "block": "bsr"}[method]
    out, rep = convert(model, layout=layout, block=tuple(block), return_report=True)
    dense = f", {len(rep.left_dense)} left dense" if rep.left_dense else ""
    return bake_masks(out), f"{len(rep.converted)} layers -> {layout}{dense}"


def _is_unstructured_masked(model: nn.Module) -> bool:
    return any(get_mask(m) is not None for m in model.modules())


# ------------------------------------------------------------------------------------------------ pipeline


@dataclass
class PipelineResult:
    """``rows``: one dict per stage (the first is the input model): stage, accuracy, params, flops,
    nnz_flops, median_s, speedup (measured vs the input model), note. ``models``: the model after each."""

    rows: list[dict]
    models: list[nn.Module] = field(repr=False)

    @property
    def model(self) -> nn.Module:
        return self.models[-1]

    def table(self) -> str:
        head = f"{'stage':<34} {'acc':>7} {'params':>9} {'FLOPs':>11} {'nnz FLOPs':>11} {'ms':>8} {'speedup':>8}  note"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            ms = f"{r['median_s'] * 1e3:.3f}" if r.get("median_s") is not None else "-"
            sp = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-"
            lines.append(
                f"{r['stage']:<34} {r['accuracy']:7.2%} {r['params']:>9} {r['flops']:>11} {r['nnz_flops']:>11} "
                f"{ms:>8} {sp:>8}  {r.get('note', '')}"
            )
        return "\n".join(lines)


def apply_prune(
    model: nn.Module,
    p: Prune,
    example_inputs: tuple,
    train_data: Iterable,
    teacher: nn.Module | None = None,
    dense_flops: int | None = None,
) -> tuple[nn.Module, str]:
    """Run one Prune stage (all its iterative steps) on a copy of ``model``; returns (model, note). Masked
    (unstructured) results keep their masks so fine-tuning keeps the zeros; :func:`finalize` converts them."""
    _check_prune(p)
    dense_flops = dense_flops or _flops(model, example_inputs)
    cur, note = copy.deepcopy(model), ""
    for i in range(1, p.steps + 1):
        level = p.level * i / p.steps
        cur, note = _prune_once(cur, p, level, example_inputs, train_data, dense_flops)
        if i < p.steps and p.between is not None:
            _finetune(cur, p.between, train_data, teacher, f"{p.method} step {i}")
    if p.steps > 1:
        note = f"{p.steps} steps; " + note
    return cur, note


def _finetune(
    model: nn.Module, ft: FineTune, train_data: Iterable, teacher: nn.Module | None, desc: str
) -> list[float]:
    if ft.distill and teacher is None:
        raise ValueError("FineTune(distill=True) needs a teacher (pipeline uses the input model by default)")
    return train(
        model,
        train_data,
        ft.epochs,
        lr=ft.lr,
        teacher=teacher if ft.distill else None,
        alpha=ft.alpha,
        temperature=ft.temperature,
        description=desc,
    )


def finalize(model: nn.Module, method: str | None, block: tuple[int, int] = (2, 2)) -> tuple[nn.Module, str]:
    """The deployable form of a pruned model (see Prune): a converted / baked copy of a masked model; any
    other model is returned as it is."""
    if _is_unstructured_masked(model):
        return _finalize_unstructured(model, method if method in UNSTRUCTURED else "magnitude", block)
    return model, ""


def pipeline(
    model: nn.Module,
    train_data: Iterable,
    val_data: Iterable,
    stages: Sequence[Stage | str] = ("prune", "finetune", "lowrank", "finetune", "int8"),
    example_inputs: torch.Tensor | tuple | None = None,
    teacher: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    time_batch: int = 64,
    threads: int | None = 1,
    budget_s: float = 10.0,
    measure: bool = True,
    seed: int = 0,
) -> PipelineResult:
    """Run ``stages`` on a copy of ``model``; accuracy on ``val_data``, params, FLOPs and latency after each.

    Args:
        model: a classifier, x: (B, ...) -> logits (B, num_classes). Not modified.
        train_data, val_data: re-iterable (x, y) batches (a DataLoader, a list of pairs, Batches), y int64
            class indices. Checked once: non-empty, one sample shape, labels in [0, num_classes).
        stages: e.g. ``[Prune("taylor", 0.5), FineTune(5, distill=True), LowRank(0.9), FineTune(2), Int8()]``
            or names; int8 must come last, pruning before lowrank.
        example_inputs: for tracing, FLOPs and timing (default: the first ``time_batch`` validation samples).
        teacher: for distillation (default: the input model).
        input_shape / num_classes: expected sample shape and class count (default: inferred from the first
            batch and the model's output).
        threads / budget_s: timing settings (every stage output is timed in one interleaved run at the end).
        measure: False skips timing (rows then carry no latency).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    parsed = parse_stages(stages)
    first = next(iter(val_data), None) if not isinstance(val_data, torch.Tensor) else None
    if input_shape is None and isinstance(first, (tuple, list)) and isinstance(first[0], torch.Tensor):
        input_shape = tuple(first[0].shape[1:])
    if num_classes is None and isinstance(first, (tuple, list)) and isinstance(first[0], torch.Tensor):
        with torch.no_grad():
            was = model.training
            num_classes = int(model.eval()(first[0][:1]).shape[-1])
            model.train(was)
    check_loader(train_data, "train_data", input_shape, num_classes)
    check_loader(val_data, "val_data", input_shape, num_classes)
    check_time_batch(time_batch)
    if example_inputs is None:
        xs = torch.cat([x for x, _ in val_data])[:time_batch]
        example_inputs = (xs,)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    one = tuple(a[:1] for a in args)  # FLOPs are per sample
    torch.manual_seed(seed)
    cur = copy.deepcopy(model).eval()
    teacher = copy.deepcopy(teacher if teacher is not None else model).eval()
    dense_flops = _flops(cur, one)
    models: list[nn.Module] = [cur]  # the deployable form after each stage (what is evaluated and timed)
    rows = [_row("input", cur, val_data, one, "")]
    method: str | None = None
    block = (2, 2)
    for s in parsed:
        note = ""
        if isinstance(s, Prune):
            cur, note = apply_prune(cur, s, one, train_data, teacher, dense_flops)
            method, block = s.method, s.block
        elif isinstance(s, FineTune):
            cur = copy.deepcopy(cur)
            losses = _finetune(cur, s, train_data, teacher, s.name)
            note = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
        else:
            cur = finalize(cur, method, block)[0]  # masks become sparse kernels / plain zeros from here on
            if isinstance(s, LowRank):
                cur, rep = lowrank(
                    cur,
                    args,
                    energy=s.energy,
                    method=s.method,
                    rank_by=s.rank_by,
                    min_speedup=s.min_speedup,
                    threads=threads,
                    seed=seed,
                )
                note = rep.summary()
            else:
                cur, note = quantize_int8(
                    cur, train_data, args, mode=s.mode, calibration_batches=s.calibration_batches
                )
        deploy, fnote = finalize(cur, method, block)
        models.append(deploy)
        rows.append(
            _row(s.name, deploy, val_data, one, "; ".join(x for x in (note, fnote) if x), prev=models[-2])
        )
    if measure:
        lat = measure_latency(
            {str(i): m for i, m in enumerate(models)}, args, "0", threads, budget_s=budget_s, seed=seed
        )
        for i, r in enumerate(rows):
            r.update({k: lat[str(i)][k] for k in ("median_s", "p10_s", "p90_s", "noisy", "speedup")})
    return PipelineResult(rows, models)


def _row(
    stage: str, model: nn.Module, val_data: Iterable, args: tuple, note: str, prev: nn.Module | None = None
) -> dict:
    if is_quantized(model):
        # FlopCounterMode does not see quantized kernels: an int8 model does the float model's MACs in int8
        base = prev if prev is not None else model
        params = count_params(base) if not is_quantized(base) else 0
        flops, nnz = _flops(base, args), effective_flops(base, args)
        note = note + "; params/FLOPs of the float model (int8 MACs)"
    else:
        params, flops, nnz = count_params(model), _flops(model, args), effective_flops(model, args)
    return {
        "stage": stage,
        "accuracy": evaluate(model, val_data),
        "params": params,
        "flops": flops,
        "nnz_flops": nnz,
        "note": note,
    }
