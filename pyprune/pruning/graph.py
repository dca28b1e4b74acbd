"""Dependency graph of coupled channels, built from a torch.fx trace run on example inputs.

Every tensor in the trace gets a *channel description*: which of its dims carries channels and which "channel
spaces" those positions belong to (a concat yields several segments; a flatten makes each channel cover
``inner`` consecutive positions). Ops that must see the same channel set (residual add, BN after conv, a
conv's input) merge spaces with union-find. Each resulting group lists the tensors ("members") to slice when
one of its channels is removed. Spaces that can't change (model inputs and outputs, grouped convs, ignored
layers) are pinned. An op the analysis does not understand pins what flows into it; if such a space is not
pinned for another reason the build fails with an error naming the node, so a pruned model is never silently
wrong.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn


class PruningError(ValueError):
    """Invalid request or a model the pruner can't handle; the message says what to change."""


class UnsupportedPatternError(PruningError):
    """A traced op touches prunable channels in a way the dependency graph does not model."""


@dataclass(frozen=True)
class Seg:
    """``size`` channels of space ``space``, each covering ``inner`` consecutive positions."""

    space: int
    size: int
    inner: int = 1


@dataclass(frozen=True)
class ChInfo:
    dim: int
    segs: tuple[Seg, ...]

    @property
    def length(self) -> int:
        return sum(s.size * s.inner for s in self.segs)


@dataclass(frozen=True)
class ParamRef:
    """A tensor that is (a broadcast view of) a parameter reached through ``get_attr``.

    ``dims[i]`` is the parameter dim shown by dim i of the view (None for a size-1 dim); None when the view
    keeps the parameter's dims.
    """

    module: str
    name: str
    dims: tuple[int | None, ...] | None = None


@dataclass(frozen=True)
class Member:
    """Positions of ``module.tensor`` along ``dim`` that belong to a space's channels.

    Channel c covers ``offset + b * block_stride + c * inner + j`` for each block b < blocks and j < inner
    (blocks describe fused q/k/v projections). ``role`` is "out" for weights that produce the channel
    (filters), "in" for weights that consume it, "norm" for BN/LN affine parameters and statistics, "param"
    for other tensors. ``tensor`` None lists a module that has no tensor on these channels but whose size
    attribute follows them (a LayerNorm without affine parameters).
    """

    module: str
    tensor: str | None
    dim: int
    role: str
    offset: int = 0
    inner: int = 1
    blocks: int = 1
    block_stride: int = 0

    def positions(self, channels: torch.Tensor) -> torch.Tensor:
        """channels: (k,) int64 -> (k, blocks * inner) positions along ``dim``."""
        j = torch.arange(self.inner)
        b = torch.arange(self.blocks) * self.block_stride
        pos = self.offset + channels[:, None, None] * self.inner + b[None, :, None] + j[None, None, :]
        return pos.reshape(len(channels), -1)


@dataclass
class Group:
    """Channels that must be pruned together; ``members`` are the tensors to slice."""

    index: int
    channels: int
    members: list[Member]
    pinned: list[str] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.members:
            seen.setdefault(m.module, None)
        return list(seen)

    @property
    def producers(self) -> list[str]:
        return list(dict.fromkeys(m.module for m in self.members if m.role == "out"))

    @property
    def prunable(self) -> bool:
        return not self.pinned and any(m.role == "out" for m in self.members)


# ------------------------------------------------------------------------------------------------------------
# ---
# Leaf-module handlers for attention: the module is traced as one node; the handler declares its members.

LeafHandler = Callable[["_Builder", fx.Node, str, nn.Module, list, Any], Any]
_LEAF_HANDLERS: dict[type, LeafHandler] = {}


def register_leaf(cls: type, handler: LeafHandler) -> None:
    """Trace ``cls`` as one node; ``handler`` declares its channel members and its output description."""
    _LEAF_HANDLERS[cls] = handler


_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
)
_MODELED_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.Embedding,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Flatten,
) + _PASS_MODULES
_PASS_FUNCS = {
    "relu",
    "relu_",
    "relu6",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "hardswish",
    "hardsigmoid",
    "leaky_relu",
    "elu",
    "mish",
    "dropout",
    "contiguous",
    "clone",
    "detach",
    "float",
    "half",
    "to",
    "type_as",
    "neg",
    "abs",
    "exp",
    "sqrt",
    "rsqrt",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "max_pool1d",
    "avg_pool1d",
    "interpolate",
    "square",
}
_BINARY = {
    "add",
    "add_",
    "iadd",
    "sub",
    "sub_",
    "isub",
    "mul",
    "mul_",
    "imul",
    "truediv",
    "div",
    "div_",
    "itruediv",
    "pow",
    "maximum",
    "minimum",
    "where",
}
_RESHAPE = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "unflatten"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_NON_TENSOR = {"size", "dim", "numel"}
# Ops returning (values, indices) along one dim: arg position of the dim, its default, whether it is reduced.
_VALUES_INDICES = {
    "max": (1, None, True),
    "min": (1, None, True),
    "median": (1, None, True),
    "nanmedian": (1, None, True),
    "mode": (1, -1, True),
    "kthvalue": (2, -1, True),
    "sort": (1, -1, False),
    "topk": (2, -1, False),
    "cummax": (1, None, False),
    "cummin": (1, None, False),
}
_MULTI_OUT = {"split", "chunk", "unbind", "tensor_split", "getitem", "getattr"}


def _fname(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    return getattr(t, "__name__", str(t)).lstrip("_") if not isinstance(t, str) else t


class _Tracer(fx.Tracer):
    def __init__(self, leaf_names: set[str]) -> None:
        super().__init__()
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _LEAF_HANDLERS or qualname in self.leaf_names or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, n_inputs: int, leaf_names: set[str] = frozenset()) -> fx.GraphModule:
    """Symbolic trace; forward arguments beyond the first ``n_inputs`` are fixed to their defaults."""
    sig = inspect.signature(model.forward)
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    concrete = {p.name: p.default for p in params[n_inputs:] if p.default is not inspect.Parameter.empty}
    try:
        graph = _Tracer(set(leaf_names)).trace(model, concrete_args=concrete or None)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError ...)
        raise PruningError(
            f"could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}). "
            "Models with data-dependent control flow can't be traced; pass the submodule that contains it "
            "in ignore=[...] so "
            "it is kept whole, or rewrite the branch without Python conditionals on tensors"
        ) from exc
    return fx.GraphModule(model, graph)


class _Builder(fx.Interpreter):
    """Runs the traced graph on example inputs and assigns a channel description to every value."""

    def __init__(self, gm: fx.GraphModule, root: nn.Module, ignore: set[str]) -> None:
        super().__init__(gm)
        self.root = root
        self.ignore = ignore
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: list[list[Member]] = []
        self.pins: list[list[str]] = []
        self.origin: list[list[str]] = []
        self.problems: list[tuple[str, list[int], str]] = []  # (node, spaces, why) for unknown ops
        self.placed: list[tuple[Member, int]] = []  # every member with the space it was attached to
        self.calls: dict[str, list[set[tuple]]] = {}  # module -> (module, tensor, dim) listed by each call
        self.info: dict[fx.Node, Any] = {}
        self.output_infos: list[Any] = []

    # -- union-find over channel spaces --------------------------------------------------------------------
    def new_space(self, size: int, origin: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.members.append([])
        self.pins.append([])
        self.origin.append([origin])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, node: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise UnsupportedPatternError(
                f"node {node.name!r} couples channel groups of sizes {self.size[ra]} and "
                f"{self.size[rb]}; this model can't be pruned as traced"
            )
        self._merge(ra, rb)

    def _merge(self, ra: int, rb: int) -> None:
        self.parent[rb] = ra
        self.members[ra] += self.members[rb]
        self.pins[ra] += self.pins[rb]
        self.origin[ra] += self.origin[rb]

    def pin(self, info: Any, reason: str) -> None:
        for s in _spaces(info):
            self.pins[self.find(s)].append(reason)

    def problem(self, node: fx.Node, info: Any, why: str) -> None:
        spaces = _spaces(info)
        if spaces:
            self.problems.append((node.name, spaces, why))

    def attach(self, space: int, member: Member) -> None:
        self.members[self.find(space)].append(member)
        self.placed.append((member, space))

    def add_members(
        self,
        info: ChInfo,
        module: str,
        tensor: str | None,
        dim: int,
        role: str,
        scale: int = 1,
        blocks: int = 1,
        block_stride: int = 0,
    ) -> None:
        """Attach ``module.tensor`` along ``dim`` to each segment of ``info``.

        Each position of ``info`` covers ``scale`` positions of the tensor (a depthwise channel multiplier).
        """
        off = 0
        for seg in info.segs:
            member = Member(module, tensor, dim, role, off * scale, seg.inner * scale, blocks, block_stride)
            self.attach(seg.space, member)
            off += seg.size * seg.inner

    # -- interpreter hooks ---------------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.info[n] = self._describe(n, result)
        return result

    def _in(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.info.get(a)
        if isinstance(a, (list, tuple)):
            return [self._in(x) for x in a]
        if isinstance(a, dict):
            return [self._in(x) for x in a.values()]
        return None

    def _describe(self, n: fx.Node, result: Any) -> Any:
        if n.op == "placeholder":
            return None
        if n.op == "get_attr":
            owner, _, name = str(n.target).rpartition(".")
            return ParamRef(owner, name) if isinstance(result, torch.Tensor) else None
        if n.op == "output":
            self.output_infos.append(self._in(n.args[0]))
            self.pin(self._in(n.args[0]), "model output")
            return None
        if n.op == "call_module":
            start = len(self.placed)
            info = self._module(n, str(n.target), self.root.get_submodule(str(n.target)), result)
            listed = {(m.module, m.tensor, m.dim) for m, _ in self.placed[start:]}
            self.calls.setdefault(str(n.target), []).append(listed)
            return info
        return self._function(n, _fname(n), result)

    # -- modules -------------------------------------------------------------------------------------------
    def _module(self, n: fx.Node, name: str, m: nn.Module, out: Any) -> Any:
        x = self._in(n.args[0]) if n.args else None
        handler = _LEAF_HANDLERS.get(type(m))
        if name in self.ignore and handler is None and not isinstance(m, _MODELED_MODULES):
            # An ignored module the analysis can't see into is opaque: its inputs and outputs keep their size.
            self.pin([self._in(a) for a in n.args], f"input of ignored module {name}")
            return None
        if handler is not None:
            return handler(self, n, name, m, [self._in(a) for a in n.args], out)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self._conv(n, name, m, x)
        if isinstance(m, nn.Linear):
            return self._linear(n, name, m, x, out)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            if isinstance(x, ChInfo):
                if x.dim != 1:
                    self.problem(n, x, f"{type(m).__name__} normalises dim 1 but channels are on dim {x.dim}")
                    return None
                self._norm_members(x, name, m, ("weight", "bias", "running_mean", "running_var"))
            return x
        if isinstance(m, nn.LayerNorm):
            if isinstance(x, ChInfo):
                if len(m.normalized_shape) != 1 or x.dim != out.dim() - 1:
                    self.problem(n, x, "LayerNorm over more than the channel (last) dim")
                    return None
                self._norm_members(x, name, m, ("weight", "bias"))
            return x
        if isinstance(m, nn.GroupNorm):
            self.pin(x, f"GroupNorm {name} (groups of channels are kept whole)")
            return None
        if isinstance(m, nn.Embedding):
            s = self.new_space(m.embedding_dim, name)
            self.attach(s, Member(name, "weight", 1, "out"))
            return ChInfo(out.dim() - 1, (Seg(s, m.embedding_dim),))
        if isinstance(m, nn.Flatten):
            return self._reshape(n, x, n.args[0], out)
        if isinstance(m, _PASS_MODULES):
            return x
        if _spaces(self._in(list(n.args))):
            self.problem(n, self._in(list(n.args)), f"module type {type(m).__name__} is not supported")
        return None

    def _norm_members(self, x: ChInfo, name: str, m: nn.Module, tensors: tuple[str, ...]) -> None:
        present = [t for t in tensors if getattr(m, t, None) is not None]
        # Without any tensor the norm is still listed, so that its size attribute follows the channels.
        for t in present or [None]:
            self.add_members(x, name, t, 0, "norm")

    def _conv(self, n: fx.Node, name: str, m: nn.Module, x: Any) -> ChInfo:
        filters = ("weight", "bias") if m.bias is not None else ("weight",)
        if isinstance(x, ChInfo) and x.dim != 1:
            self.problem(n, x, f"conv {name} reads channels from dim 1 but they are on dim {x.dim}")
            x = None
        if m.groups == 1:
            if isinstance(x, ChInfo):
                self.add_members(x, name, "weight", 1, "in")
            s = self.new_space(m.out_channels, name)
            for t in filters:
                self.attach(s, Member(name, t, 0, "out"))
            return ChInfo(1, (Seg(s, m.out_channels),))
        if m.groups == m.in_channels and isinstance(x, ChInfo):
            # Depthwise (optionally with a channel multiplier): output channel k*mult+j reads input channel k,
            # so the output shares the input's channels and the filters follow them.
            mult = m.out_channels // m.in_channels
            for t in filters:
                self.add_members(x, name, t, 0, "out", scale=mult)
            return ChInfo(1, tuple(Seg(s.space, s.size, s.inner * mult) for s in x.segs))
        reason = f"grouped conv {name} (groups={m.groups}) is kept intact"
        self.pin(x, reason)
        s = self.new_space(m.out_channels, name)
        for t in filters:
            self.attach(s, Member(name, t, 0, "out"))
        self.pins[s].append(reason)
        return ChInfo(1, (Seg(s, m.out_channels),))

    def _linear(self, n: fx.Node, name: str, m: nn.Linear, x: Any, out: torch.Tensor) -> ChInfo:
        if isinstance(x, ChInfo):
            if x.dim != out.dim() - 1:
                self.problem(n, x, f"Linear {name} reads the last dim but channels are on dim {x.dim}")
            else:
                self.add_members(x, name, "weight", 1, "in")
        s = self.new_space(m.out_features, name)
        self.attach(s, Member(name, "weight", 0, "out"))
        if m.bias is not None:
            self.attach(s, Member(name, "bias", 0, "out"))
        return ChInfo(out.dim() - 1, (Seg(s, m.out_features),))

    # -- functions and methods -----------------------------------------------------------------------------
    def _function(self, n: fx.Node, f: str, out: Any) -> Any:
        args = [self._in(a) for a in n.args]
        if f in _NON_TENSOR:
            return None
        if f in _VALUES_INDICES and isinstance(out, tuple):
            return self._values_indices(n, f, args[0], out)
        if not isinstance(out, torch.Tensor) and f not in _MULTI_OUT:
            if isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out):
                self.problem(n, args, f"op {f!r} returns several tensors and is not supported")
            return None
        if f in _PASS_FUNCS or (f == "softmax" and not self._is_channel_dim(n, 1)):
            return args[0] if args else None
        if f in _BINARY:
            return self._broadcast(n, list(n.args), out)
        if f in _RESHAPE:
            info = self._reshape(n, args[0], n.args[0], out)
            if isinstance(info, ChInfo) and f in ("view", "reshape"):
                shape = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
                if info.dim < len(shape) and isinstance(shape[info.dim], int) and shape[info.dim] != -1:
                    # A literal size in the code can't follow the pruned channel count.
                    self.pin(info, f"{n.name}: {f} with a fixed size {shape[info.dim]} on the channel dim")
            return info
        if f in ("permute", "transpose", "t", "movedim"):
            return self._permute(n, f, args[0], out)
        if f in ("expand", "expand_as", "repeat") and isinstance(args[0], ParamRef):
            return args[0]
        if f in ("expand", "expand_as") and isinstance(args[0], ChInfo):
            return ChInfo(args[0].dim + out.dim() - self.env[n.args[0]].dim(), args[0].segs)
        if f in _REDUCE:
            return self._reduce(n, args[0], out)
        if f in ("cat", "concat", "concatenate"):
            return self._cat(n, out)
        if f in ("split", "chunk", "tensor_split", "unbind"):
            return self._split(n, f, out)
        if f == "getitem":
            return self._getitem(n, out)
        if f == "getattr":
            return self._attribute(n, args[0], n.args[1], out)
        if f == "scaled_dot_product_attention":
            self.problem(n, args, "attention outside a registered attention module")
            return None
        if _spaces(args) or any(isinstance(a, ChInfo) for a in self._in(list(n.kwargs.values()))):
            self.problem(n, args, f"op {f!r} is not supported by the channel dependency analysis")
        return None

    def _is_channel_dim(self, n: fx.Node, pos: int) -> bool:
        x = self._in(n.args[0])
        d = n.args[pos] if len(n.args) > pos else n.kwargs.get("dim")
        if not isinstance(x, ChInfo) or d is None:
            return False
        return d % self.env[n.args[0]].dim() == x.dim

    def _broadcast(self, n: fx.Node, operands: list, out: torch.Tensor) -> Any:
        """Elementwise op: channel dims that line up (broadcasting from the right) are the same channels."""
        nd = out.dim()
        tracked = [
            (self.info[a], self.env[a])
            for a in operands
            if isinstance(a, fx.Node) and isinstance(self.info.get(a), ChInfo)
        ]
        if not tracked:
            return None
        # A one-channel operand (a spatial attention map) broadcasts; the reference is one with the channels.
        ref, ref_t = next(((i, t) for i, t in tracked if i.length != 1), tracked[0])
        d = ref.dim + nd - ref_t.dim()
        result = ChInfo(d, ref.segs)
        for a in operands:
            if not isinstance(a, fx.Node) or not isinstance(self.env.get(a), torch.Tensor):
                continue
            t, info = self.env[a], self.info.get(a)
            ad = d - (nd - t.dim())
            size = t.shape[ad] if ad >= 0 else 1
            if isinstance(info, ChInfo):
                if info.dim + nd - t.dim() != d:
                    if size != 1:
                        self.problem(n, [ref, info], "elementwise op mixes channels on different dims")
                    continue
                if info.length == 1 and ref.length != 1:
                    continue
                if [(s.size, s.inner) for s in info.segs] != [(s.size, s.inner) for s in ref.segs]:
                    self.problem(n, [ref, info], "elementwise op on differently concatenated channels")
                    continue
                for s1, s2 in zip(ref.segs, info.segs):
                    self.union(s1.space, s2.space, n)
            elif isinstance(info, ParamRef):
                p = self._param(info)
                dims = info.dims if info.dims is not None else tuple(range(p.dim()))
                vd = d - (nd - len(dims))
                pd = dims[vd] if vd >= 0 else None
                if pd is not None and p.shape[pd] == ref.length:
                    self.add_members(result, info.module, info.name, pd, "param")
                elif pd is not None and p.shape[pd] != 1:
                    self.problem(
                        n, ref, f"parameter {info.module}.{info.name} broadcasts against the channels"
                    )
            elif size != 1:
                # A fixed tensor of full channel length: the partner's channels can't change either.
                self.pin(ref, f"{n.name}: combined with a tensor whose size is fixed")
        return result

    def _param(self, ref: ParamRef) -> torch.Tensor:
        owner = self.root.get_submodule(ref.module) if ref.module else self.root
        return getattr(owner, ref.name)

    def _reshape(self, n: fx.Node, x: Any, src: Any, out: torch.Tensor) -> Any:
        shape_in, shape_out = list(self.env[src].shape), list(out.shape)
        if isinstance(x, ParamRef):
            # Only adding or removing size-1 dims keeps track of which parameter dim each view dim shows.
            if [s for s in shape_in if s != 1] != [s for s in shape_out if s != 1]:
                return None
            dims_in = x.dims if x.dims is not None else tuple(range(len(shape_in)))
            shown = iter(pd for pd, s in zip(dims_in, shape_in) if s != 1)
            return ParamRef(x.module, x.name, tuple(next(shown) if s != 1 else None for s in shape_out))
        if not isinstance(x, ChInfo):
            return None
        before, length = math.prod(shape_in[: x.dim]), shape_in[x.dim]
        after = math.prod(shape_in[x.dim + 1 :])
        for k in range(len(shape_out)):
            if math.prod(shape_out[:k]) != before or shape_out[k] < length or shape_out[k] % max(length, 1):
                continue
            mult = shape_out[k] // max(length, 1)
            if after % mult == 0 and math.prod(shape_out[k + 1 :]) == after // mult:
                return ChInfo(k, tuple(Seg(s.space, s.size, s.inner * mult) for s in x.segs))
        self.problem(n, x, f"reshape {shape_in} -> {shape_out} splits the channel dim")
        return None

    def _permute(self, n: fx.Node, f: str, x: Any, out: torch.Tensor) -> Any:
        if not isinstance(x, ChInfo):
            return None
        nd = out.dim()
        rest = [a for a in n.args[1:]]
        if f == "t":
            perm = [1, 0]
        elif f == "permute":
            perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        else:  # transpose / movedim of two dims
            a, b = (int(rest[0]) % nd, int(rest[1]) % nd)
            perm = list(range(nd))
            if f == "transpose":
                perm[a], perm[b] = perm[b], perm[a]
            else:
                perm.pop(a)
                perm.insert(b, a)
        perm = [p % nd for p in perm]
        return ChInfo(perm.index(x.dim), x.segs)

    def _attribute(self, n: fx.Node, x: Any, name: str, out: Any) -> Any:
        if isinstance(x, list):  # the (values, indices) pair of a tuple-returning op
            return x[("values", "indices").index(name)] if name in ("values", "indices") else None
        if not isinstance(x, ChInfo) or not isinstance(out, torch.Tensor):
            return None
        nd = out.dim()
        if name in ("mT", "mH"):
            return ChInfo({nd - 1: nd - 2, nd - 2: nd - 1}.get(x.dim, x.dim), x.segs)
        if name in ("T", "H"):
            return ChInfo(nd - 1 - x.dim, x.segs)
        if name == "data":
            return x
        self.problem(n, x, f"tensor attribute {name!r} is not supported")
        return None

    def _values_indices(self, n: fx.Node, f: str, x: Any, out: tuple) -> list:
        """max/min/sort/topk/... with a dim: values and indices carry the input's channels alike."""
        if not isinstance(x, ChInfo):
            return [None] * len(out)
        pos, default, reduces = _VALUES_INDICES[f]
        dim = n.args[pos] if len(n.args) > pos else n.kwargs.get("dim", default)
        nd = self.env[n.args[0]].dim()
        if dim % nd == x.dim:
            why = "reduction over the channel dim" if reduces else f"{f} along the channel dim"
            self.problem(n, x, why)
            return [None] * len(out)
        if not reduces:
            return [x] * len(out)
        keep = n.args[pos + 1] if len(n.args) > pos + 1 else n.kwargs.get("keepdim", False)
        return [x if keep else ChInfo(x.dim - (dim % nd < x.dim), x.segs)] * len(out)

    def _reduce(self, n: fx.Node, x: Any, out: torch.Tensor) -> Any:
        if not isinstance(x, ChInfo):
            return None
        inp = self.env[n.args[0]]
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dims is None:
            self.problem(n, x, "reduction over all dims, including channels")
            return None
        dims = [d % inp.dim() for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if x.dim in dims:
            self.problem(n, x, "reduction over the channel dim")
            return None
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        return x if keep else ChInfo(x.dim - sum(d < x.dim for d in dims), x.segs)

    def _cat(self, n: fx.Node, out: torch.Tensor) -> Any:
        tensors = list(n.args[0])
        dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % out.dim()
        infos = [self.info.get(t) for t in tensors]
        chs = [i for i in infos if isinstance(i, ChInfo)]
        if not chs:
            return None
        if all(i.dim != dim for i in chs):
            return self._broadcast(n, tensors, out)  # concat along tokens/batch: channels must agree
        segs: list[Seg] = []
        for t, info in zip(tensors, infos):
            length = self.env[t].shape[dim]
            if isinstance(info, ChInfo) and info.dim == dim:
                segs += info.segs
            else:
                # An untracked piece keeps its size: give it its own pinned space.
                s = self.new_space(length, n.name)
                self.pins[s].append(f"{n.name}: concatenated with a tensor whose size is fixed")
                if isinstance(info, ChInfo):
                    self.problem(n, info, "concat of tensors whose channels sit on different dims")
                segs.append(Seg(s, length))
        return ChInfo(dim, tuple(segs))

    def _split(self, n: fx.Node, f: str, out: Any) -> Any:
        x = self.info.get(n.args[0])
        if not isinstance(x, ChInfo):
            return [None] * len(out)
        inp = self.env[n.args[0]]
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        if f == "unbind":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        dim %= inp.dim()
        if dim != x.dim:
            if f == "unbind":
                return [ChInfo(x.dim - (dim < x.dim), x.segs)] * len(out)
            return [x] * len(out)
        # Split sizes (or the chunk count) are constants in the model's code, so the channels on either side
        # of
        # a channel-dim split must keep their number.
        self.pin(x, f"{n.name}: {f} along the channel dim has sizes fixed in the model code")
        return [None] * len(out)

    def _getitem(self, n: fx.Node, out: Any) -> Any:
        src, idx = n.args[0], n.args[1]
        x = self.info.get(src)
        if isinstance(x, list):
            return x[idx] if isinstance(idx, int) else None
        if not isinstance(x, ChInfo) or not isinstance(self.env[src], torch.Tensor):
            return None
        idx = idx if isinstance(idx, tuple) else (idx,)
        nd = self.env[src].dim()
        if any(i is Ellipsis for i in idx):
            e = idx.index(Ellipsis)
            n_real = sum(i is not None for i in idx) - 1
            idx = idx[:e] + (slice(None),) * (nd - n_real) + idx[e + 1 :]
        out_dim, in_dim = 0, 0
        for i in idx:
            if i is None:
                out_dim += 1
                continue
            if in_dim == x.dim:
                if isinstance(i, slice) and i == slice(None):
                    return ChInfo(out_dim, x.segs)
                self.problem(n, x, "indexing selects part of the channel dim")
                return None
            if isinstance(i, int):
                in_dim += 1
            elif isinstance(i, slice):
                in_dim += 1
                out_dim += 1
            else:
                self.problem(n, x, "advanced indexing next to the channel dim")
                return None
        return ChInfo(out_dim + x.dim - in_dim, x.segs)

    # -- tensors listed more than once ---------------------------------------------------------------------
    def couple_repeats(self, ignore: set[str]) -> None:
        """A module called twice (or a parameter used twice) lists its tensors once per use.

        Slicing cuts each tensor once, so a position listed by several uses must hold the same channel in
        each: equal listings merge their spaces, and a dim that one call lists and another does not (that
        call's input can't change) is kept whole. Ignored modules are skipped: their groups are pinned anyway.
        """
        for module, calls in self.calls.items():
            partial = set().union(*calls) - set.intersection(*calls)
            if not partial or _within(module, ignore):
                continue
            why = f"{module} is called more than once, once on channels that can't change"
            for m, s in self.placed:
                if (m.module, m.tensor, m.dim) in partial:
                    self.pins[self.find(s)].append(why)
        space: dict[Member, int] = {}
        listings: dict[tuple, list[Member]] = {}
        for m, s in self.placed:
            if _within(m.module, ignore):
                continue
            if m not in space:
                space[m] = s
                listings.setdefault((m.module, m.tensor, m.dim), []).append(m)
                continue
            ra, rb = self.find(space[m]), self.find(s)
            if ra != rb:
                if self.size[ra] != self.size[rb]:
                    raise _repeat_error(m, f"groups of {self.size[ra]} and {self.size[rb]} channels")
                self._merge(ra, rb)
        for ms in listings.values():
            if len(ms) == 1:
                continue
            pos = torch.cat([m.positions(torch.arange(self.size[self.find(space[m])])).flatten() for m in ms])
            if pos.unique().numel() < pos.numel():
                raise _repeat_error(ms[0], "channels laid out differently (concat, flatten)")

    # -- result --------------------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        roots = sorted({self.find(s) for s in range(len(self.parent))})
        out = []
        for r in roots:
            uniq = list(dict.fromkeys(self.members[r]))
            out.append(
                Group(
                    len(out),
                    self.size[r],
                    uniq,
                    list(dict.fromkeys(self.pins[r])),
                    list(dict.fromkeys(self.origin[r])),
                )
            )
        return out


def _within(module: str, names: set[str]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def _repeat_error(m: Member, why: str) -> UnsupportedPatternError:
    what = f"{m.module}.{m.tensor}" if m.tensor else m.module
    return UnsupportedPatternError(
        f"{what} is used more than once (a module called twice or a shared parameter) on {why}, "
        f"which can't be pruned consistently; pass {m.module!r} in ignore=[...] to keep it intact"
    )


def _spaces(info: Any) -> list[int]:
    if isinstance(info, ChInfo):
        return [s.space for s in info.segs]
    if isinstance(info, (list, tuple)):
        return [s for i in info for s in _spaces(i)]
    return []


@dataclass
class DependencyGraph:
    """Groups of coupled channels of ``model`` (see module docstring)."""

    model: nn.Module
    groups: list[Group]
    traced: fx.GraphModule

    def group_of(self, module: str, role: str | None = None) -> list[Group]:
        return [
            g
            for g in self.groups
            if any(m.module == module and (role is None or m.role == role) for m in g.members)
        ]


def build_graph(model: nn.Module, example_inputs: tuple, ignore: set[str] = frozenset()) -> DependencyGraph:
    """Trace ``model``, run it on ``example_inputs`` and group coupled channels.

    Raises UnsupportedPatternError naming the node when an op the analysis does not model touches channels
    that nothing else pins.
    """
    modules = dict(model.named_modules())
    # Composite modules in ``ignore`` stay opaque so that the tracer doesn't need to see inside them.
    leaf = {name for name in ignore if name in modules and len(list(modules[name].children())) > 0}
    gm = trace(model, len(example_inputs), leaf)
    b = _Builder(gm, model, set(ignore))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            b.run(*example_inputs)
    finally:
        model.train(was_training)
    b.couple_repeats(set(ignore))
    for name in ignore:
        for s in range(len(b.parent)):
            r = b.find(s)
            if any(m.module == name or m.module.startswith(name + ".") for m in b.members[r]):
                b.pins[r].append(f"ignored layer {name}")
    for node, spaces, why in b.problems:
        if any(not b.pins[b.find(s)] for s in spaces):
            layers = sorted({m.module for s in spaces for m in b.members[b.find(s)] if m.role == "out"})
            raise UnsupportedPatternError(
                f"node {node!r}: {why}. Pass the layers that produce these channels in ignore=[...] to keep "
                "them "
                f"intact: {layers}"
            )
        for s in spaces:
            b.pins[b.find(s)].append(f"{node}: {why}")
    return DependencyGraph(model, b.groups(), gm)


def slice_model(model: nn.Module, groups: list[Group], removed: dict[int, torch.Tensor]) -> None:
    """Remove channels ``removed[group.index]`` (int64 indices) from every member tensor, in place."""
    cuts: dict[tuple[str, str], dict[int, list[torch.Tensor]]] = {}
    for g in groups:
        idx = removed.get(g.index)
        if idx is None or idx.numel() == 0:
            continue
        for m in g.members:
            cuts.setdefault((m.module, m.tensor), {}).setdefault(m.dim, []).append(
                m.positions(idx).reshape(-1)
            )
    touched: dict[str, int] = {}  # module -> positions removed from its tensorless member
    for (mod_name, t_name), dims in cuts.items():
        if t_name is None:
            touched[mod_name] = sum(int(torch.cat(pos).unique().numel()) for pos in dims.values())
            continue
        mod = model.get_submodule(mod_name) if mod_name else model
        t = getattr(mod, t_name)
        new = t.detach()
        for dim, pos in dims.items():
            drop = torch.zeros(new.shape[dim], dtype=torch.bool)
            drop[torch.cat(pos)] = True
            new = new.index_select(dim, (~drop).nonzero().squeeze(1))
        new = new.clone()
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        setattr(mod, t_name, new)  # a buffer stays a buffer, a plain tensor attribute a plain attribute
        touched.setdefault(mod_name, 0)
    for name, dropped in touched.items():
        _fix_attributes(model, name, dropped)


_FIXUPS: dict[type, Callable[[nn.Module, str, nn.Module], None]] = {}


def register_fixup(cls: type, fn: Callable[[nn.Module, str, nn.Module], None]) -> None:
    """``fn(root, name, module)`` updates ``module``'s size attributes after its tensors were sliced."""
    _FIXUPS[cls] = fn


def _fix_attributes(root: nn.Module, name: str, dropped: int) -> None:
    """Update size attributes from the sliced tensors; a module without any loses ``dropped`` positions."""
    m = root.get_submodule(name) if name else root
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if m.groups > 1 and m.groups == m.in_channels:
            mult = m.out_channels // m.in_channels
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.groups = m.out_channels // mult
        else:
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        t = m.running_mean if m.running_mean is not None else m.weight
        m.num_features = t.shape[0] if t is not None else m.num_features - dropped
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (m.weight.shape[0] if m.weight is not None else m.normalized_shape[0] - dropped,)
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = m.weight.shape[1]
    # Composite owners (attention modules) are fixed from their own and their children's names.
    for owner in {name, name.rpartition(".")[0]}:
        om = root.get_submodule(owner) if owner else root
        fix = _FIXUPS.get(type(om))
        if fix is not None:
            fix(root, owner, om)
