"""``convert(model, layout="auto", example_inputs=...)``: per masked layer, the storage that runs fastest here.

Each masked layer is timed in isolation on the input it receives from ``example_inputs``, as dense (mask
baked in) and as every sparse layout that can hold its pattern exactly (csr always; bsr; 2:4 only when every
group of 4 inputs keeps at most 2), interleaved as in ``pyprune.compare``; the fastest wins. With
``train=True`` what is timed is a training step's share of the layer: its forward and its backward to its
input and to its trainable parameters, for a model to be fine-tuned (the sparse backward's speed differs from
the forward's: csr kxk convs take ATen's input gradient above 30% density, the stored values' gradient is
sparse only up to 10%). Decisions are cached in memory per device, thread count, dtype, layer shape, input
shape, pattern (density, BSR block fill, 2:4-ness) and train, so the repeated shapes of a transformer are
measured once.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from ..pruning.convert import ConvertReport, plain_encoder_inputs, weight_read_directly
from ..pruning.masks import copy_of, get_mask
from .timing import time_interleaved
from .variants import _baked, _set

CANDIDATES = ("dense", "csr", "bsr", "2:4")
_CACHE: dict[tuple, tuple[str, dict[str, float]]] = {}


def clear_cache() -> None:
    """Forget every measured decision (e.g. after changing the machine's load or the thread count)."""
    _CACHE.clear()


def _args(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _is_24(w2: torch.Tensor) -> bool:
    k = w2.shape[1]
    if k % 4:
        w2 = torch.nn.functional.pad(w2, (0, 4 - k % 4))
    return bool((w2.reshape(w2.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())


def _block_fill(w2: torch.Tensor, block: tuple[int, int]) -> float:
    """Nonzeros / elements of the blocks a BSR copy would store (1.0 = no explicit zeros)."""
    bh, bw = block
    o, k = w2.shape
    p = torch.nn.functional.pad(w2, (0, (-k) % bw, 0, (-o) % bh)).ne(0)
    tiles = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).sum((1, 3))
    stored = int((tiles > 0).sum()) * bh * bw
    return int(tiles.sum()) / stored if stored else 1.0


def _candidate(layer: nn.Module, layout: str, block) -> nn.Module:
    from .. import nn as pnn

    dense = _baked(layer)
    if layout == "dense":
        return dense
    if isinstance(dense, nn.Linear):
        return pnn.SparseLinear.from_dense(dense, sparsity=None, layout=layout, block=block)
    sc = getattr(pnn, "SparseConv2d", None)
    if sc is None:
        raise NotImplementedError("no pyprune.nn.SparseConv2d in this build")
    return sc.from_dense(dense, sparsity=None, layout=layout, block=block)


def _w2(layer: nn.Module) -> torch.Tensor:
    """The weight as the sparse modules store it: (out, in) for Linear, tap-major (out, kh*kw*in) for conv."""
    w = layer.weight.detach()
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w


def _key(layer: nn.Module, x: torch.Tensor, candidates, block, train: bool) -> tuple:
    w = layer.weight.detach()
    w2 = _w2(layer)
    density = float(w2.ne(0).float().mean())
    # a conv's geometry and padding mode decide what can run it and how fast, as does x's memory format
    geometry = tuple(
        getattr(layer, a, None) for a in ("stride", "padding", "dilation", "groups", "padding_mode")
    )
    return (
        str(w.device), torch.get_num_threads(), str(w.dtype), type(layer).__name__, tuple(w.shape),
        tuple(x.shape), x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last), geometry,
        round(density, 2), round(_block_fill(w2, block), 2), _is_24(w2), tuple(block), tuple(candidates),
        train, train and tuple(p.requires_grad for p in layer.parameters()),
    )  # fmt: skip


def _measure(layer: nn.Module, x: torch.Tensor, candidates, block, rounds: int, budget_s: float, train: bool):
    mods = {}
    for c in candidates:
        if c == "2:4" and not _is_24(_w2(layer)):
            continue
        try:
            mods[c] = _candidate(layer, c, block).eval()
            with torch.no_grad():
                mods[c](x)
        except (NotImplementedError, RuntimeError, ValueError, TypeError):
            mods.pop(c, None)
    fns = {c: (lambda m=m: m(x)) for c, m in mods.items()}
    if train and mods:
        fns = _training_steps(mods, x)
    samples = time_interleaved(fns, rounds, torch.get_num_threads(), budget_s)
    times = {c: statistics.median(ts) for c, ts in samples.items()}
    return min(times, key=times.get), times


def _training_steps(mods: dict[str, nn.Module], x: torch.Tensor) -> dict:
    """Per candidate: forward, then backward of a fixed output gradient to x (as every layer of a network but
    the first needs it) and to the trainable parameters, gradients cleared before each step."""
    x = x.detach().requires_grad_(x.is_floating_point())
    with torch.no_grad():
        g = torch.randn_like(next(iter(mods.values()))(x))

    def step(m: nn.Module) -> None:
        with torch.enable_grad():
            m.zero_grad(set_to_none=True)
            x.grad = None
            y = m(x)
            if y.requires_grad:
                y.backward(g)

    return {c: (lambda m=m: step(m)) for c, m in mods.items()}


def _fixed(model: nn.Module, name: str, m: nn.Module) -> str | None:
    """Why a masked layer keeps its form whatever is fastest (its owner reads its weight itself), or None."""
    return weight_read_directly(model, name) if isinstance(m, nn.Linear) else None


def plan(
    model: nn.Module,
    example_inputs,
    candidates=CANDIDATES,
    block: tuple[int, int] = (32, 32),
    rounds: int = 5,
    budget_s: float = 0.3,
    train: bool = False,
) -> dict[str, tuple[str, dict[str, float]]]:
    """{masked layer name: (fastest layout, {layout: median seconds})}, measured on this device (cached);
    ``train``: seconds of a forward and backward (see the module docstring)."""
    bad = [c for c in candidates if c not in CANDIDATES]
    if bad or not candidates:
        raise ValueError(f"candidates: unknown {bad}; valid candidates are {list(CANDIDATES)}")
    if example_inputs is None:
        raise ValueError(
            "convert(layout='auto') needs example_inputs=: each layer is timed on the input it receives"
        )
    args = _args(example_inputs)
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and get_mask(m) is not None and not _fixed(model, n, m)
    }
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, inp, n=n: inputs.setdefault(n, inp[0].detach()))
        for n, m in layers.items()
    ]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, layer in layers.items():
        if name not in inputs:
            continue  # not reached by example_inputs: left as is
        key = _key(layer, inputs[name], candidates, block, train)
        if key not in _CACHE:
            _CACHE[key] = _measure(layer, inputs[name], candidates, block, rounds, budget_s, train)
        out[name] = _CACHE[key]
    return out


def convert_auto(
    model: nn.Module,
    example_inputs,
    block: tuple[int, int] = (32, 32),
    inplace: bool = False,
    return_report: bool = False,
    candidates=CANDIDATES,
    train: bool = False,
):
    """Replace every masked Linear / Conv2d by its fastest form here (see the module docstring): a plain
    layer with the mask baked in, or ``SparseLinear`` / ``SparseConv2d`` in csr, bsr or 2:4; ``train``: the
    fastest over a forward and backward."""
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy_of(model)
    was_training = target.training
    target.eval()
    decisions = plan(target, example_inputs, candidates, block, train=train)
    report = ConvertReport()
    for name, m in target.named_modules():
        why = _fixed(target, name, m) if get_mask(m) is not None else None
        if why is not None:
            report.left_dense[name] = f"Linear: {why}"
    for name, (layout, times) in decisions.items():
        _set(target, name, _candidate(target.get_submodule(name), layout, block))
        report.layouts[name] = layout
        timing = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
        if layout == "dense":
            report.left_dense[name] = f"auto: dense is fastest here ({timing})"
        else:
            report.converted.append(name)
    plain_encoder_inputs(target)
    target.train(was_training)
    return (target, report) if return_report else target
