"""How much work a variant does: useful FLOPs, bytes it must move at least, and the same per layer.

*Useful* FLOPs count only multiply-adds with a nonzero weight (2 FLOPs each): a masked dense layer at 90%
sparsity does ten times the useful work it needs, a BSR layer also multiplies the zeros inside its kept blocks;
neither counts here (``flops_executed`` keeps what the kernels actually perform). Everything else the model
computes (attention products, ...) comes from ``torch.utils.flop_counter.FlopCounterMode``, which ignores
elementwise ops, norms and pooling.

*Bytes* is a lower bound on memory traffic: every stored parameter and buffer read once (the sparse formats'
indices included) plus each weight layer's input and output activations crossing memory once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..ops.pruned_conv2d import output_size


def _sparse_conv_cls():
    from .. import nn as pnn

    return getattr(pnn, "SparseConv2d", None)


def layer_types() -> tuple[type, ...]:
    """Module classes treated as one weight layer (timed, counted and advised on as a unit)."""
    from ..nn import PrunedConv2d, SparseLinear
    from .variants import TorchSparseLinear

    types = [nn.Linear, nn.Conv2d, SparseLinear, PrunedConv2d, TorchSparseLinear]
    sc = _sparse_conv_cls()
    if sc is not None:
        types.append(sc)
    return tuple(types)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    types = layer_types()
    return {name: m for name, m in model.named_modules() if isinstance(m, types) and name}


def kind(m: nn.Module) -> str:
    """The layer's class name; a masked layer (torch parametrization class "ParametrizedLinear") is "Linear+mask"."""
    name = type(m).__name__
    return name[len("Parametrized") :] + "+mask" if name.startswith("Parametrized") else name


def _nonzero(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(t.detach()))


def _dense_weight(m: nn.Module) -> torch.Tensor | None:
    """The weight as the layer applies it (masked weights come out masked), for layers without a custom op."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        return m.weight
    sc = _sparse_conv_cls()
    if sc is not None and isinstance(m, sc) and hasattr(m, "to_dense"):
        return m.dense_conv().weight
    return None


def _layer_flops(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(useful, executed) FLOPs of one call of weight layer ``m`` on input ``x`` with output ``y``."""
    from ..nn import PrunedConv2d, SparseLinear
    from .variants import TorchSparseLinear

    if isinstance(m, SparseLinear):
        rows = x.numel() // m.in_features
        return 2 * _nonzero(m.weight.values) * rows, 2 * m.weight.nnz * rows
    if isinstance(m, TorchSparseLinear):
        rows = x.numel() // m.in_features
        nnz = m.weight_csr._nnz()
        return 2 * _nonzero(m.weight_csr.values()) * rows, 2 * nnz * rows
    if isinstance(m, PrunedConv2d):
        w = m.weight
        # the conv's N * OH * OW (y is after the max pool, when one is fused)
        oh, ow = output_size(x.shape[2:], w.shape[2:], m.stride, m.padding, m.dilation)
        positions = x.shape[0] * oh * ow
        per_out = w[0].numel()
        return 2 * _nonzero(w) * positions, 2 * w.shape[0] * per_out * positions
    w = _dense_weight(m)
    if w is None:
        return 0, 0
    if isinstance(m, nn.Linear) or w.dim() == 2:
        rows = x.numel() // w.shape[1]
        return 2 * _nonzero(w) * rows, 2 * w.numel() * rows
    positions = y.numel() // y.shape[1]
    return 2 * _nonzero(w) * positions, 2 * w.numel() * positions


def _storage_bytes(m: nn.Module, recurse: bool = True) -> int:
    """Bytes of the parameters and buffers as stored (a parametrized weight counts its original and mask)."""
    from .variants import TorchSparseLinear

    n = sum(p.numel() * p.element_size() for p in m.parameters(recurse=recurse))
    n += sum(b.numel() * b.element_size() for b in m.buffers(recurse=recurse))
    mods = m.modules() if recurse else [m]
    return n + sum(x.stored()[1] for x in mods if isinstance(x, TorchSparseLinear))


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (its memory footprint at rest)."""
    return _storage_bytes(model)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _act_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernel (absent from torch's registry: without
    it a transformer's attention counts 0 FLOPs when SDPA takes the fused CPU path, and the full bmm count when
    a variant's layout sends it down the math path)."""
    mapping = {}
    packet = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if packet is not None:
        from torch.utils.flop_counter import flop_registry

        if packet not in flop_registry:
            mapping[packet] = _sdpa_cpu_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


def measure_work(model: nn.Module, args: tuple) -> dict:
    """One forward pass of ``model(*args)`` (no grad) counting work.

    Returns ``{"flops", "flops_executed", "bytes", "weight_bytes", "layers"}`` where ``layers`` maps each weight
    layer's name to ``{"kind", "flops", "flops_executed", "bytes", "shape"}`` (summed over its calls)."""
    layers = weight_layers(model)
    per: dict[str, dict] = {}
    counted = [0]  # FLOPs the FlopCounterMode attributed to weight layers (dense nn.Linear / Conv2d calls)
    state: dict[str, int] = {}
    counter = _flop_counter()

    def pre(name):
        def hook(mod, inp):
            state[name] = counter.get_total_flops()

        return hook

    def post(name):
        def hook(mod, inp, out):
            counted[0] += counter.get_total_flops() - state.pop(name)
            x = _tensors(inp)[0]
            useful, executed = _layer_flops(mod, x, _tensors(out)[0])
            e = per.setdefault(
                name,
                {
                    "kind": kind(mod),
                    "flops": 0,
                    "flops_executed": 0,
                    "bytes": _storage_bytes(mod),
                    "shape": f"{tuple(x.shape)}->{tuple(_tensors(out)[0].shape)}",
                },
            )
            e["flops"] += useful
            e["flops_executed"] += executed
            e["bytes"] += _act_bytes(inp) + _act_bytes(out)

        return hook

    handles = []
    for name, m in layers.items():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name)))
    # nn.MultiheadAttention / nn.TransformerEncoderLayer's inference fast path is one fused op FlopCounterMode
    # counts as 0: the work is counted on their standard path (the same math)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            model(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
    other = counter.get_total_flops() - counted[0]
    weight_bytes = model_bytes(model)
    act = sum(e["bytes"] for e in per.values()) - sum(_storage_bytes(m) for m in layers.values())
    return {
        "flops": other + sum(e["flops"] for e in per.values()),
        "flops_executed": other + sum(e["flops_executed"] for e in per.values()),
        "bytes": weight_bytes + act,
        "weight_bytes": weight_bytes,
        "layers": per,
    }


def time_layers(
    model: nn.Module, args: tuple, repeats: int = 5, sync: Callable[[], None] | None = None
) -> dict:
    """Median seconds per forward spent inside each weight layer, over ``repeats`` passes (after one warm-up),
    timed with forward hooks around the layer call (``sync`` is called at both ends, e.g. a CUDA sync)."""
    import statistics

    layers = weight_layers(model)
    samples: dict[str, list[float]] = {name: [] for name in layers}
    acc: dict[str, float] = {}
    start: dict[str, float] = {}
    sync = sync or (lambda: None)

    def pre(name):
        def hook(mod, inp):
            sync()
            start[name] = time.perf_counter()

        return hook

    def post(name):
        def hook(mod, inp, out):
            sync()
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - start.pop(name)

        return hook

    handles = []
    for name, m in layers.items():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name)))
    try:
        with torch.no_grad():
            model(*args)
            for _ in range(repeats):
                acc.clear()
                model(*args)
                for name in layers:
                    if name in acc:
                        samples[name].append(acc[name])
    finally:
        for h in handles:
            h.remove()
    return {name: statistics.median(ts) for name, ts in samples.items() if ts}
