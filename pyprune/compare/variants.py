"""The variants ``pyprune.compare`` times, built from one model.

- ``dense``: the model as given (the baseline);
- ``masked``: ``sparsify(pattern="unstructured")`` run as is: the zeros are there, the speed is not (the mask is
  applied on every forward, as with torch.nn.utils.prune);
- ``channel``: ``prune_channels`` (L1) at the ratio whose kept Linear/Conv2d weights best match the level, i.e.
  weights(channel) ~= (1 - level) * weights(dense), found by bisection on the ratio; the engine's (oneDNN /
  BLAS) kernels run the smaller shapes. When the engine cannot shrink that far (protected first/last layers,
  attention heads), the closest reachable model is used and the note says so;
- ``channel-pyprune``: that same channel-pruned model with every Conv2d replaced by
  ``pyprune.nn.PrunedConv2d.from_dense``, its following eval-mode BatchNorm folded and ReLU and nn.MaxPool2d
  fused where the fx graph shows the conv's output feeding only them, and a skip connection's add (and a
  ReLU after it) where the conv's output feeds only an add of a same-shaped tensor (shapes from one run of
  the example input); other nn.MaxPool2d layers become ``pyprune.nn.MaxPool2d``;
- ``csr``: the masked model converted with ``convert(layout="csr")``; ``bsr``: ``sparsify(pattern="block")`` of
  the layers whose shape tiles by ``block``, converted to BSR; ``2:4``: ``sparsify(pattern="2:4")`` then
  ``convert(layout="2:4")`` (density is fixed at 1/2, so it is built once, at level 0.5). Conv2d layers are
  converted too when ``pyprune.nn.SparseConv2d`` exists; otherwise their masks are baked into plain convs.
  In all three, an eval-mode BatchNorm2d that alone follows a conv is folded into it first (``fold_bn``; zeros
  stay zeros), as channel-pyprune folds its own, each nn.MaxPool2d becomes ``pyprune.nn.MaxPool2d`` (the
  kernel channel-pyprune fuses into its convs; ATen's NCHW max pool is many times slower on the CPU), and the
  ReLUs and skip connections' adds after a SparseConv2d are fused into it (``fuse_sparse_epilogues``);
- ``torch.sparse``: the masked model's Linear weights as ``torch.sparse_csr`` tensors, ``y^T = W @ x^T`` through
  ``torch.mm`` (MKL on CPU): the incumbent sparse baseline.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn._trainable import copy_requires_grad
from ..pruning import convert, get_mask, prune_channels, sparsify, to_pruned_convs
from ..pruning.convert import weight_read_directly

METHODS = ("dense", "masked", "channel", "channel-pyprune", "csr", "bsr", "2:4", "torch.sparse")


class NotApplicable(Exception):
    """A variant that does not apply to this model; the row says why instead of crashing."""


class TorchSparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` a ``torch.sparse_csr`` tensor (the torch.sparse baseline)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with (
            warnings.catch_warnings()
        ):  # "sparse CSR support is in beta": known, and the point of the baseline
            warnings.simplefilter("ignore", UserWarning)
            self.weight_csr = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.mm(self.weight_csr, x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        self.weight_csr = fn(self.weight_csr)
        return super()._apply(fn, recurse)

    def stored(self) -> tuple[int, int]:
        """(stored weight values, bytes of values + indices): the CSR tensor is not a parameter or buffer."""
        w = self.weight_csr
        parts = (w.values(), w.crow_indices(), w.col_indices())
        return w.values().numel(), sum(t.numel() * t.element_size() for t in parts)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.weight_csr._nnz()}"
        )


def stored_params(model: nn.Module) -> int:
    """Parameter elements as stored, counting the torch.sparse baseline's CSR values too."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(m.stored()[0] for m in model.modules() if isinstance(m, TorchSparseLinear))


def prunable_weights(model: nn.Module) -> int:
    """Weight elements of the weight layers (what sparsify masks); masked weights count in full, pyprune's
    sparse layers at their dense size and a PrunedConv2d at its kept size (so kept_weights never exceeds it)."""
    from ..nn import PrunedConv2d, SparseLinear

    n = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, PrunedConv2d)):
            n += m.weight.numel()
        elif isinstance(m, SparseLinear):
            n += m.in_features * m.out_features
        elif isinstance(m, TorchSparseLinear):
            n += m.weight_csr.shape[0] * m.weight_csr.shape[1]
        elif _is_sparse_conv(m):
            n += m.dense_conv().weight.numel()
    return n


def kept_weights(model: nn.Module) -> int:
    """Nonzero weights of the weight layers, whatever their storage (dense, masked, sparse, pruned conv)."""
    from ..nn import PrunedConv2d, SparseLinear

    n = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, PrunedConv2d)):
            n += int(torch.count_nonzero(m.weight.detach()))
        elif isinstance(m, SparseLinear):
            n += int(torch.count_nonzero(m.weight.values.detach()))
        elif isinstance(m, TorchSparseLinear):
            n += int(torch.count_nonzero(m.weight_csr.values()))
        elif _is_sparse_conv(m):
            n += int(torch.count_nonzero(m.dense_conv().weight.detach()))
    return n


def _sparse_conv_cls():
    from .. import nn as pnn

    return getattr(pnn, "SparseConv2d", None)


def _is_sparse_conv(m: nn.Module) -> bool:
    sc = _sparse_conv_cls()
    return sc is not None and isinstance(m, sc)


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _baked(m: nn.Module) -> nn.Module:
    """A plain copy of a masked Linear / Conv2d whose weight holds the masked values (zeros stay zeros).

    A fresh module rather than remove_parametrizations: removing them from a deep copy of a parametrized
    model also strips the original's, which other variants still use."""
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    elif isinstance(m, nn.Conv2d):
        new = nn.Conv2d(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
            bias=m.bias is not None, padding_mode=m.padding_mode,
        )  # fmt: skip
    else:
        raise NotApplicable(f"cannot bake the mask of a {type(m).__name__}")
    new = new.to(device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(m.weight.detach())
        if m.bias is not None:
            new.bias.copy_(m.bias.detach())
    return copy_requires_grad(new, m)  # a frozen layer stays frozen in every variant and in convert(auto)


def _bake_all(model: nn.Module) -> int:
    """Bake every remaining mask in place; returns how many layers were baked."""
    names = [name for name, m in model.named_modules() if get_mask(m) is not None]
    for name in names:
        _set(model, name, _baked(model.get_submodule(name)))
    return len(names)


def _convert_convs(model: nn.Module, layout: str, block: tuple[int, int]) -> tuple[int, str]:
    """Replace masked Conv2d layers by ``pyprune.nn.SparseConv2d`` when it exists; returns (count, why not)."""
    sc = _sparse_conv_cls()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and get_mask(m) is not None]
    if not convs:
        return 0, ""
    if sc is None:
        return 0, "no pyprune.nn.SparseConv2d yet"
    done, why = 0, ""
    for name in convs:
        try:
            new = sc.from_dense(_baked(model.get_submodule(name)), sparsity=None, layout=layout, block=block)
        except (TypeError, ValueError, NotImplementedError, RuntimeError) as exc:
            why = f"SparseConv2d.from_dense: {exc}"
            continue
        _set(model, name, new)
        done += 1
    return done, why


def _shared_modules(gm: torch.fx.GraphModule) -> set:
    """Modules the graph calls more than once: folding a BN or ReLU into one would carry it into its other
    calls."""
    seen, shared = set(), set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            (shared if node.target in seen else seen).add(node.target)
    return shared


def _bn_after(node, modules) -> tuple | None:
    """(bn node, bn module) when ``node``'s output feeds only an eval-mode BatchNorm2d with running
    statistics."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    bn = modules.get(users[0].target)
    if not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_mean is None:
        return None
    return users[0], bn


def _traced_copy(model: nn.Module) -> torch.fx.GraphModule:
    """An fx trace of a copy of ``model``, without the type annotations of its nodes: a module written with
    ``from __future__ import annotations`` annotates them with strings, which GraphModule's pickling cannot
    handle (torch.save of the result failed)."""
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    for node in gm.graph.nodes:
        node.type = None
    gm.recompile()
    return gm


def fold_bn(model: nn.Module) -> tuple[nn.Module, int, str]:
    """A copy of ``model`` with every eval-mode BatchNorm2d that alone consumes a Conv2d's output folded into
    that conv (its weight scaled per output channel, a masked conv's mask kept: zeros stay zeros; a bias
    added) and taken out of the graph; a conv the graph calls twice is left alone. Returns (model, BNs folded,
    why none were: an fx trace failure); ``model`` itself, not a copy, when it has no BatchNorm2d or fx cannot
    trace it (callers compare identities to know whether they hold a copy)."""
    from ..nn._bn import bn_affine

    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model, 0, ""
    try:
        gm = _traced_copy(model)
    except Exception as exc:  # noqa: BLE001  (fx raises many types)
        return model, 0, f"fx trace failed ({type(exc).__name__}), BN not folded"
    modules, shared = dict(gm.named_modules()), _shared_modules(gm)
    folded = 0
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or node.target in shared:
            continue
        found = _bn_after(node, modules)
        if found is None:
            continue
        bn_node, bn = found
        scale, shift = bn_affine(bn, conv.out_channels)
        masked = parametrize.is_parametrized(conv, "weight")
        weight = conv.parametrizations.weight.original if masked else conv.weight
        with torch.no_grad():
            weight.mul_(scale.view(-1, 1, 1, 1).to(weight.dtype))
            bias = (conv.bias.detach() * scale if conv.bias is not None else 0) + shift
            conv.bias = nn.Parameter(bias.to(weight.dtype))
        bn_node.replace_all_uses_with(node)
        gm.graph.erase_node(bn_node)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, folded, ""


def _fusable_relu(node, modules) -> tuple[bool, float | None]:
    """Whether ``node`` is an activation PrunedConv2d fuses, and its cap: a ReLU (None), ReLU6 (6.0) or a
    Hardtanh clamping at 0 from below (its max_val)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, nn.Hardtanh):  # nn.ReLU6 is one
            return m.min_val == 0 and m.max_val > 0, float(m.max_val)
        return isinstance(m, nn.ReLU), None
    if node.op == "call_function" and node.target is nn.functional.relu6:
        return True, 6.0
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, nn.functional.relu), None
    return node.op == "call_method" and node.target in ("relu", "relu_"), None


def _fusable_pool(node, modules) -> nn.MaxPool2d | None:
    """The nn.MaxPool2d that node calls, if PrunedConv2d can fuse it."""
    from ..nn.pruned_conv2d import fusable_max_pool

    m = modules.get(node.target) if node.op == "call_module" else None
    return m if fusable_max_pool(m) else None


def _tensor_shapes(gm: torch.fx.GraphModule, example: tuple) -> dict:
    """{node: (shape, dtype)} of the tensor each node of ``gm`` produced on ``example`` (no gradients, every
    module in eval mode for the run, its training flags restored after: a BatchNorm in training mode would
    update its statistics); {} when the run fails."""
    from torch.fx.passes.shape_prop import ShapeProp

    flags = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
    except Exception:  # noqa: BLE001  (a model may reject the example: then no residual is fused)
        return {}
    finally:
        for m, flag in flags.items():
            m.training = flag
    meta = {n: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    return {n: (tuple(t.shape), t.dtype) for n, t in meta.items() if hasattr(t, "shape")}


_ADDS = {("call_function", operator.add), ("call_function", operator.iadd), ("call_function", torch.add),
         ("call_method", "add"), ("call_method", "add_")}  # fmt: skip


def _residual_of(node, out, shapes: dict):
    """The other operand when ``node`` adds a same-shaped activation to ``out`` (a skip connection: a plain
    two-operand add, no alpha, no broadcast, not a module attribute), else None."""
    if (node.op, node.target) not in _ADDS or node.kwargs or len(node.args) != 2 or out not in node.args:
        return None
    other = node.args[1] if node.args[0] is out else node.args[0]
    # (a module attribute, such as a learned (1, C, H, W) table, matches the shape only at the example's batch)
    if not isinstance(other, torch.fx.Node) or other is out or other.op == "get_attr":
        return None
    if out not in shapes or shapes.get(other) != shapes[out] or shapes.get(node) != shapes[out]:
        return None
    return other


def _call_at_add(gm, node, add_node, residual, relu_node, shapes: dict, between=None) -> None:
    """The conv of call ``node`` moves to the place of ``add_node`` (where its residual exists), called with
    (its input, ``residual``): its output replaces the add's, or the ReLU's after it; the ReLU, the add,
    ``between`` (a BN folded between conv and add) and ``node`` leave the graph."""
    with gm.graph.inserting_before(add_node):
        fused = gm.graph.call_module(node.target, (node.args[0], residual))
    (relu_node or add_node).replace_all_uses_with(fused)
    if add_node in shapes:  # (a later add may take this output as its residual)
        shapes[fused] = shapes[add_node]
    for dead in (relu_node, add_node, between, node):  # users before what they use
        if dead is not None:
            gm.graph.erase_node(dead)


def fuse_pruned_convs(model: nn.Module, example: tuple | None = None) -> tuple[nn.Module, dict]:
    """``model`` (not modified) with every Conv2d as a PrunedConv2d, BN folded, ReLU (or ReLU6) and max pool
    fused where the fx graph allows (the conv output feeds only an eval-mode BatchNorm2d, whose output feeds
    only the ReLU, whose output feeds only an nn.MaxPool2d). Given the model's ``example`` inputs (which fix
    the tensors' shapes), a skip connection's add after the conv (or its BN), and a ReLU after the add, go into
    the conv too (``PrunedConv2d(x, residual)``). Returns (new model, counts {"conv", "bn", "relu", "pool",
    "residual", "skipped"} and "why" for a model fx cannot trace)."""
    from ..nn import PrunedConv2d

    counts = {"conv": 0, "bn": 0, "relu": 0, "pool": 0, "residual": 0, "skipped": 0, "why": ""}
    try:
        gm = _traced_copy(model)
    except Exception as exc:  # noqa: BLE001  (fx raises many types; fall back to per-module replacement)
        counts["why"] = f"fx trace failed ({type(exc).__name__}), BN not folded"
        out = copy.deepcopy(model)
        for name, m in list(out.named_modules()):
            if isinstance(m, nn.Conv2d):
                try:
                    _set(out, name, PrunedConv2d.from_dense(m))
                    counts["conv"] += 1
                except (TypeError, ValueError):
                    counts["skipped"] += 1
        return out, counts
    modules, shared = dict(gm.named_modules()), _shared_modules(gm)
    shapes = _tensor_shapes(gm, example) if example is not None else {}
    done = set()  # a conv the graph calls twice is replaced (and counted) once
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        if node.target in done:
            continue
        done.add(node.target)
        conv, bn, bn_node, relu_node, relu_max, last = modules[node.target], None, None, None, None, node
        found = _bn_after(node, modules) if node.target not in shared else None
        if found is not None:
            bn_node, bn = found
            last = bn_node
        users = list(last.users)
        add_node, residual = None, None
        if node.target not in shared and len(users) == 1 and len(node.args) == 1 and not node.kwargs:
            residual = _residual_of(users[0], last, shapes)
            add_node = users[0] if residual is not None else None
        users = list((add_node or last).users)
        if node.target not in shared and len(users) == 1:
            fusable, relu_max = _fusable_relu(users[0], modules)
            relu_node = users[0] if fusable else None
        pool_node, pool = None, None
        users = list((relu_node or last).users)
        if node.target not in shared and len(users) == 1 and add_node is None:
            pool = _fusable_pool(users[0], modules)
            pool_node = users[0] if pool is not None else None
        try:
            new = PrunedConv2d.from_dense(
                conv, bn=bn, relu=relu_node is not None, max_pool=pool,
                relu_max=relu_max if relu_node is not None else None,
            )  # fmt: skip
        except (TypeError, ValueError):
            counts["skipped"] += 1
            continue
        _set(gm, node.target, new)
        counts["conv"] += 1
        if add_node is not None:
            _call_at_add(gm, node, add_node, residual, relu_node, shapes, bn_node)
            counts["residual"] += 1
            counts["relu"] += relu_node is not None
            counts["bn"] += bn_node is not None
            continue
        if pool_node in shapes:  # the conv's node now gives the pool's output
            shapes[node] = shapes[pool_node]
        if pool_node is not None:
            pool_node.replace_all_uses_with(node)
            gm.graph.erase_node(pool_node)
            counts["pool"] += 1
        if relu_node is not None:
            relu_node.replace_all_uses_with(node)
            gm.graph.erase_node(relu_node)
            counts["relu"] += 1
        if bn_node is not None:
            bn_node.replace_all_uses_with(node)
            gm.graph.erase_node(bn_node)
            counts["bn"] += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, counts


class _PyPruneLeaves(torch.fx.Tracer):
    """fx's tracer with pyprune's modules as leaves (their forward checks arguments fx cannot trace)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("pyprune.") or super().is_leaf_module(m, qualname)


def fuse_sparse_epilogues(model: nn.Module, example: tuple) -> tuple[nn.Module, dict]:
    """Moves each skip connection's add after a SparseConv2d, and a ReLU (or ReLU6, a Hardtanh floored at 0)
    after the conv (or the add), into the conv (``relu=True``, ``relu_max``; ``SparseConv2d(x,
    residual)``), where their kernels apply both in their stores (the sparse-linear routes: in place after
    the op). ``model`` (a variant's
    own copy: its modules are reused) is changed in place when it is an fx GraphModule (what fold_bn
    returns), else traced with pyprune's modules as leaves; ``example`` fixes the tensors' shapes, which a
    residual must match. Returns (model, {"relu": n, "residual": n}); the model as
    given when fx cannot trace it."""
    counts = {"relu": 0, "residual": 0}
    if not any(_is_sparse_conv(m) for m in model.modules()):
        return model, counts
    gm = model
    if not isinstance(gm, torch.fx.GraphModule):
        try:
            graph = _PyPruneLeaves().trace(model)
        except Exception:  # noqa: BLE001  (fx raises many types: the model stays unfused)
            return model, counts
        for node in graph.nodes:
            node.type = None  # (see _traced_copy)
        gm = torch.fx.GraphModule(model, graph)
    modules, shared = dict(gm.named_modules()), _shared_modules(gm)
    shapes = _tensor_shapes(gm, example)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target in shared or len(node.args) != 1 or node.kwargs:
            continue
        conv = modules.get(node.target)
        if not _is_sparse_conv(conv) or conv.relu:
            continue
        users = list(node.users)
        residual = _residual_of(users[0], node, shapes) if len(users) == 1 else None
        add_node = users[0] if residual is not None else None
        users = list((add_node or node).users)
        relu_node, relu_max = None, None
        if len(users) == 1:
            fusable, relu_max = _fusable_relu(users[0], modules)
            relu_node = users[0] if fusable else None
        conv.relu = relu_node is not None
        conv.relu_max = relu_max if relu_node is not None else None
        counts["relu"] += relu_node is not None
        if add_node is not None:
            _call_at_add(gm, node, add_node, residual, relu_node, shapes)
            counts["residual"] += 1
        elif relu_node is not None:
            relu_node.replace_all_uses_with(node)
            gm.graph.erase_node(relu_node)
    gm.graph.lint()
    gm.recompile()
    return gm, counts


class Builder:
    """Builds the variants of one model, sharing the expensive steps (one unstructured mask per level, one
    channel-pruning search per level) between the methods that start from them."""

    def __init__(self, model: nn.Module, args: tuple, block: tuple[int, int] = (32, 32)):
        self.model, self.args, self.block = model, args, tuple(block)
        self.dense_w = prunable_weights(model)
        self._masked: dict[float, nn.Module] = {}
        self._channel: dict[float, tuple[nn.Module, str]] = {}
        self._ratio_cache: dict[float, tuple[nn.Module, int]] = {}
        self._folded: tuple[nn.Module, int, str] | None = None

    def build(self, method: str, level: float | None) -> tuple[nn.Module, str]:
        """(module in eval mode, note). Raises NotApplicable with the reason when the method does not apply."""
        fn: dict[str, Callable] = {
            "dense": lambda: (self.model, ""),
            "masked": lambda: (self.masked(level), ""),
            "channel": lambda: self.channel(level),
            "channel-pyprune": lambda: self.channel_pyprune(level),
            "csr": lambda: self.csr(level),
            "bsr": lambda: self.structured_sparse("bsr", level),
            "2:4": lambda: self.structured_sparse("2:4", level),
            "torch.sparse": lambda: self.torch_sparse(level),
        }
        if method not in fn:
            raise ValueError(f"method: unknown {method!r}; valid methods are {list(METHODS)}")
        mod, note = fn[method]()
        return mod.eval(), note

    def masked(self, level: float) -> nn.Module:
        if level not in self._masked:
            self._masked[level] = sparsify(self.model, level, pattern="unstructured")
        return self._masked[level]

    def folded(self) -> tuple[nn.Module, int, str]:
        """``fold_bn(model)``, once: the base of every bsr and 2:4 level (which copy it, never change it)."""
        if self._folded is None:
            self._folded = fold_bn(self.model)
        return self._folded

    def csr(self, level: float) -> tuple[nn.Module, str]:
        out, rep = convert(self.masked(level), "csr", self.block, return_report=True, example_inputs=self.args,
                           fuse=True)  # fmt: skip
        _, why = _convert_convs(out, "csr", self.block)
        baked = _bake_all(out)
        f = rep.fused
        return out, _sparse_note(out, "csr", baked, why, f["bn"], f["why"], f["max_pool"], f)

    def torch_sparse(self, level: float) -> tuple[nn.Module, str]:
        out = copy.deepcopy(self.masked(level))
        names = [
            n
            for n, m in out.named_modules()
            if isinstance(m, nn.Linear)
            and get_mask(m) is not None
            and weight_read_directly(out, n, pyprune_weight=False) is None
        ]
        if not names:
            raise NotApplicable("no Linear layer it can replace (torch.sparse has no sparse convolution)")
        for name in names:
            _set(out, name, TorchSparseLinear(_baked(out.get_submodule(name))))
        baked = _bake_all(out)
        note = f"{len(names)} linear -> torch.sparse_csr"
        if baked:
            note += f", {baked} dense (no torch.sparse conv; Linears whose owner reads .weight)"
        return out, note

    def structured_sparse(self, method: str, level: float) -> tuple[nn.Module, str]:
        """Linear layers: ``sparsify`` with the block / 2:4 pattern, then ``convert``. Conv2d layers (when
        SparseConv2d exists): ``SparseConv2d.from_dense(conv, sparsity, layout)``, which selects the pattern in
        its own (tap-major) weight layout, so blocks and 2:4 groups line up with what its kernel stores."""
        bh, bw = self.block
        base, n_bn, why_bn = self.folded()
        good, bad = [], []
        for name, m in base.named_modules():
            if isinstance(m, nn.Linear):
                ok = (
                    (m.out_features % bh == 0 and m.in_features % bw == 0)
                    if method == "bsr"
                    else m.in_features % 4 == 0
                )
                (good if ok and weight_read_directly(base, name) is None else bad).append(name)
        if good:
            kw = {"pattern": "block", "block": self.block} if method == "bsr" else {"pattern": "2:4"}
            masked = sparsify(base, level, types=(nn.Linear,), ignore=bad, **kw)
            out = convert(masked, layout=method, block=self.block, inplace=True)
        else:
            out = copy.deepcopy(base)
        convs = [n for n, m in out.named_modules() if isinstance(m, nn.Conv2d)]
        sc, why, kept = _sparse_conv_cls(), "", 0
        for name in convs:
            if sc is None:
                why, kept = "no pyprune.nn.SparseConv2d yet", len(convs)
                break
            try:
                new = sc.from_dense(out.get_submodule(name), sparsity=level, layout=method, block=self.block)
            except (TypeError, ValueError, NotImplementedError, RuntimeError) as exc:
                why, kept = f"SparseConv2d.from_dense: {str(exc).splitlines()[0][:120]}", kept + 1
                continue
            _set(out, name, new)
        if not good and kept == len(convs):
            shape = f"tiles by {self.block}" if method == "bsr" else "has inputs % 4 == 0"
            raise NotApplicable(
                f"no Linear layer {shape}" + (f" and no conv converts ({why})" if convs else "")
            )
        pools = pyprune_pools(out)
        out, fused = fuse_sparse_epilogues(out, self.args)
        note = _sparse_note(out, method, 0, "", n_bn, why_bn, pools, fused)
        if bad or kept:
            note += f", {len(bad) + kept} kept dense" + (f" ({why})" if why else "")
        return out, note

    def _prune_at(self, ratio: float) -> tuple[nn.Module, int]:
        if ratio not in self._ratio_cache:
            m = prune_channels(self.model, self.args, ratio=ratio)
            self._ratio_cache[ratio] = (m, prunable_weights(m))
        return self._ratio_cache[ratio]

    def channel(self, level: float, steps: int = 8) -> tuple[nn.Module, str]:
        """Bisection on prune_channels' ratio so that prunable weights ~= (1 - level) * dense."""
        if level in self._channel:
            return self._channel[level]
        if self.dense_w == 0:
            raise NotApplicable("no Linear / Conv2d weights to prune")
        target = (1.0 - level) * self.dense_w
        lo, hi, best = 0.0, 0.95, None
        for _ in range(steps):
            mid = round((lo + hi) / 2, 6)
            m, w = self._prune_at(mid)
            if best is None or abs(w - target) < abs(best[2] - target):
                best = (mid, m, w)
            lo, hi = (mid, hi) if w > target else (lo, mid)
        if best[2] > target:  # the top of the range may reach lower than the bisection visited
            m, w = self._prune_at(hi)
            if abs(w - target) < abs(best[2] - target):
                best = (hi, m, w)
        ratio, m, w = best
        note = f"ratio {ratio:.3f}"
        if abs(w / self.dense_w - (1 - level)) > 0.05:
            note += f"; kept {1 - level:.2f} not reachable"
        self._channel[level] = (m, note)
        return m, note

    def channel_pyprune(self, level: float) -> tuple[nn.Module, str]:
        if not any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            raise NotApplicable("no Conv2d layer (PrunedConv2d is a convolution kernel)")
        base, note = self.channel(level)
        out, c = to_pruned_convs(base, self.args, return_report=True)
        if c["conv"] == 0:
            raise NotApplicable(f"no Conv2d could become a PrunedConv2d ({c['skipped']} skipped) {c['why']}")
        parts = [f"{c['conv']} conv -> PrunedConv2d", f"{c['bn']} BN folded", f"{c['relu']} ReLU fused"]
        if c["residual"]:
            parts.append(f"{c['residual']} residual add fused")
        if c["pool"]:
            parts.append(f"{c['pool']} max pool fused")
        if c["max_pool"]:  # the pools no conv feeds alone
            parts.append(f"{c['max_pool']} max pool -> pyprune")
        if c["skipped"]:
            parts.append(f"{c['skipped']} conv kept")
        if c["why"]:
            parts.append(c["why"])
        return out, "; ".join([note] + [", ".join(parts)])


def pyprune_pools(model: nn.Module) -> int:
    """Replace, in place, every nn.MaxPool2d that ``pyprune.nn.MaxPool2d`` covers by one; returns how many."""
    from ..nn import MaxPool2d
    from ..nn.pruned_conv2d import fusable_max_pool

    names = [n for n, m in model.named_modules() if type(m) is nn.MaxPool2d and fusable_max_pool(m)]
    for name in names:
        _set(model, name, MaxPool2d.from_dense(model.get_submodule(name)))
    return len(names)


def _sparse_note(model: nn.Module, layout: str, baked: int, why: str, bn: int = 0, why_bn: str = "",
                 pools: int = 0, fused: dict | None = None) -> str:  # fmt: skip
    """What a sparse variant holds: its sparse layers, the layers left dense and why, the BNs folded, the max
    pools on pyprune's kernel, the ReLUs and residual adds fused into its convs (``fused``)."""
    from ..nn import SparseLinear

    n_lin = sum(isinstance(m, SparseLinear) for m in model.modules())
    n_conv = sum(_is_sparse_conv(m) for m in model.modules())
    note = f"{n_lin} linear"
    if n_conv:
        note += f", {n_conv} conv"
    note += f" -> {layout}"
    if baked:
        note += f", {baked} dense" + (f" ({why})" if why else "")
    if bn:
        note += f", {bn} BN folded"
    elif why_bn:
        note += f", {why_bn}"
    if pools:
        note += f", {pools} max pool -> pyprune"
    if fused and fused["relu"]:
        note += f", {fused['relu']} ReLU fused"
    if fused and fused["residual"]:
        note += f", {fused['residual']} residual add fused"
    return note
