"""Swap masked layers for kernel-backed sparse modules."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..nn._trainable import copy_requires_grad
from .masks import copy_of, get_mask

LAYOUTS = ("csr", "bsr", "2:4")


@dataclass
class ConvertReport:
    """Which layers ``convert`` replaced and which masked layers it left dense (with why)."""

    converted: list[str] = field(default_factory=list)
    left_dense: dict[str, str] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)  # layout="auto": the form chosen per masked layer
    # fuse=True: {"bn": BatchNorms folded, "max_pool": pools on pyprune's kernel, "relu": ReLUs / ReLU6s and
    # "residual": skip connections' adds fused into the sparse convs, "why": why no BN was folded, or ""}
    fused: dict = field(default_factory=dict)


def weight_read_directly(model: nn.Module, name: str, pyprune_weight: bool = True) -> str | None:
    """Why layer ``name`` of ``model`` must stay an ``nn.Linear``, or None: its owner reads ``.weight``
    itself instead of calling the layer (a module without a weight tensor there breaks it).

    ``pyprune_weight``: the replacement's ``.weight`` is a pyprune sparse format, whose ``__torch_function__``
    sends nn.TransformerEncoderLayer past its fused fast path to the path that calls linear1 / linear2; False
    for a replacement without one (compare's torch.sparse baseline)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
        return "nn.MultiheadAttention reads out_proj.weight itself"
    if not pyprune_weight and isinstance(parent, nn.TransformerEncoderLayer) and attr in ("linear1", "linear2"):
        return f"nn.TransformerEncoderLayer's fast path reads {attr}.weight itself"
    return None


def plain_encoder_inputs(model: nn.Module) -> None:
    """An nn.TransformerEncoder turns a padded input into a NestedTensor when its first layer can take the fused
    fast path, and a layer holding a pyprune sparse Linear cannot take it (nor a NestedTensor): encoders with one
    keep plain tensors (``use_nested_tensor = False``)."""
    from ..sparse.base import SparseFormat

    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(getattr(sub, "weight", None), SparseFormat) for sub in m.layers.modules()
        ):
            m.use_nested_tensor = False


def _baked_linear(m: nn.Linear) -> nn.Linear:
    """A plain nn.Linear whose weight is the masked weight (exact zeros where the mask is off)."""
    lin = nn.Linear(
        m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype
    )
    lin.weight.data.copy_(m.weight.detach())  # reading .weight applies the mask
    if m.bias is not None:
        lin.bias.data.copy_(m.bias.detach())
    return copy_requires_grad(lin, m)


def _baked_conv(m: nn.Conv2d) -> nn.Conv2d:
    """A plain nn.Conv2d whose weight is the masked weight."""
    conv = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
        bias=m.bias is not None, padding_mode=m.padding_mode, device=m.weight.device, dtype=m.weight.dtype,
    )  # fmt: skip
    conv.weight.data.copy_(m.weight.detach())
    if m.bias is not None:
        conv.bias.data.copy_(m.bias.detach())
    return copy_requires_grad(conv, m)


def convert(
    model: nn.Module,
    layout: str = "csr",
    block: tuple[int, int] = (32, 32),
    inplace: bool = False,
    return_report: bool = False,
    example_inputs=None,
    train: bool = False,
    fuse: bool = False,
) -> nn.Module | tuple[nn.Module, ConvertReport]:
    """Replace every masked ``nn.Linear`` by ``pyprune.nn.SparseLinear.from_dense(..., sparsity=None)`` and every
    masked ``nn.Conv2d`` by ``pyprune.nn.SparseConv2d.from_dense(..., sparsity=None)``, which store exactly the
    zeros of the masked weight in ``layout`` ("csr", "bsr" with tiles ``block`` = (bh, bw), or "2:4").

    A masked Linear whose owner reads its ``.weight`` itself (nn.MultiheadAttention's out_proj) is left dense
    with its mask, and so is a masked Conv2d
    that SparseConv2d cannot hold in ``layout`` (non-zero padding modes, groups > 1 outside "csr", and "2:4"
    on kxk convs whose mask is not 2:4 along SparseConv2d's tap-major inputs: sparsify's N:M groups run over
    (C, kh, kw)); the report lists each with the reason.
    A masked Linear whose mask ``layout`` cannot hold (not 2:4 for "2:4") raises ValueError naming it.
    Other masked layers are left dense too. Returns the converted model, or ``(model, ConvertReport)`` if
    ``return_report``.

    The modules keep their stored pattern while training, but bsr / 2:4 store whole blocks / pairs: zeros of
    the mask inside a stored block (or filling a 2:4 group) are stored values, and fine-tuning updates them.

    ``layout="auto"`` (needs ``example_inputs``) times each masked layer as dense and in every layout that holds
    its pattern, on the input it receives, on this device, and keeps the fastest (``report.layouts``); with
    ``train=True`` the fastest over a forward and backward (to the layer's input and trainable parameters),
    for a model about to be fine-tuned. ``train`` applies to "auto" only.

    ``fuse=True`` (inference; needs ``example_inputs`` and an eval-mode model) returns the model that
    ``pyprune.compare`` times for csr, bsr and 2:4: every eval-mode BatchNorm2d that alone follows a conv
    folded into it before the conversion (zeros stay zeros), each ``nn.MaxPool2d`` on pyprune's kernel
    (``pyprune.nn.MaxPool2d``), and the ReLUs / ReLU6s and skip connections' adds after a SparseConv2d fused
    into it. The result is an fx GraphModule when a BatchNorm was folded or an epilogue
    fused; ``report.fused`` counts each. Not with ``inplace`` (folding makes a traced copy) or ``train``.
    """
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be a bool, got {type(fuse).__name__}")
    if fuse:
        return _convert_fused(model, layout, block, inplace, return_report, example_inputs, train)
    if layout == "auto":
        # layout="auto": time each masked layer dense / csr / bsr / 2:4 on its input from example_inputs on
        # this device and keep the fastest (pyprune.compare.auto; decisions cached per device and shape)
        from ..compare.auto import convert_auto

        return convert_auto(
            model, example_inputs, block=block, inplace=inplace, return_report=return_report, train=train
        )
    if train:
        raise ValueError(
            f"train=True applies to layout='auto' (layers timed over a training step), not {layout!r}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS + ('auto',)}, got {layout!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        from ..nn import SparseConv2d, SparseLinear
    except ImportError as exc:  # the sparse modules are built in a separate issue
        raise ImportError(
            f"convert needs pyprune.nn.SparseLinear, which is not available in this build ({exc})"
        ) from exc
    target = model if inplace else copy_of(model)
    report = ConvertReport()
    for name, mod in list(target.named_modules()):
        if get_mask(mod) is None:
            continue
        if isinstance(mod, nn.Conv2d):
            try:
                sparse = SparseConv2d.from_dense(_baked_conv(mod), sparsity=None, layout=layout, block=block)
            except ValueError as exc:
                report.left_dense[name] = f"Conv2d: {exc}"
                continue
        elif isinstance(mod, nn.Linear):
            why = weight_read_directly(target, name)
            if why is not None:
                report.left_dense[name] = f"Linear: {why}"
                continue
            try:
                sparse = SparseLinear.from_dense(_baked_linear(mod), sparsity=None, layout=layout, block=block)
            except ValueError as exc:
                if layout != "2:4":  # csr and bsr hold any mask: a bad argument (block), reported as it is
                    raise
                raise ValueError(  # its mask is not 2:4: the user's choice, not a limit
                    f"convert(layout={layout!r}): masked Linear {name!r} cannot be stored that way ({exc}); "
                    f"mask it with sparsify(pattern={layout!r}) or choose another layout"
                ) from exc
        else:
            report.left_dense[name] = f"{type(mod).__name__}: only nn.Linear and nn.Conv2d are converted"
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(target.get_submodule(parent_name) if parent_name else target, attr, sparse)
        report.converted.append(name)
    plain_encoder_inputs(target)
    return (target, report) if return_report else target


def _convert_fused(model, layout, block, inplace, return_report, example_inputs, train):
    """convert(..., fuse=True): fold_bn, convert, pyprune's max pools, fused epilogues (the steps of
    pyprune.compare's csr, bsr and 2:4 variants, pyprune.compare.variants)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise ValueError("fuse=True needs example_inputs (the shapes decide which adds are skip connections)")
    if model.training:
        raise ValueError("fuse=True folds BatchNorm's running statistics: call model.eval() first")
    if inplace:
        raise ValueError("inplace=True cannot go with fuse=True (folding BatchNorm makes a traced copy)")
    if train:
        raise ValueError("fuse=True gives an inference model; train=True times layers for fine-tuning")
    from ..compare.variants import fold_bn, fuse_sparse_epilogues, pyprune_pools

    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    folded, n_bn, why = fold_bn(model)
    out, report = convert(folded, layout, block, inplace=folded is not model, return_report=True,
                          example_inputs=args)  # fmt: skip
    pools = pyprune_pools(out)
    out, fused = fuse_sparse_epilogues(out, args)
    report.fused = {"bn": n_bn, "max_pool": pools, **fused, "why": why}
    out.eval()
    return (out, report) if return_report else out


def to_pruned_convs(model: nn.Module, example_inputs=None, return_report: bool = False):
    """A copy of ``model`` (a channel-pruned one, as ``prune_channels`` leaves it, or any model) with every
    ``nn.Conv2d`` on pyprune's conv kernel, ``pyprune.nn.PrunedConv2d``: what ``pyprune compare`` times as
    channel-pyprune. In eval mode, a BatchNorm2d that alone follows a conv is folded into it, and a ReLU (or
    ReLU6) and an ``nn.MaxPool2d`` after it are fused into its kernel; given ``example_inputs`` (which fix the
    shapes), so is a skip connection's add after the conv (and a ReLU after the add). Other nn.MaxPool2d
    layers run on ``pyprune.nn.MaxPool2d``. A conv PrunedConv2d cannot hold (non-zero padding modes) stays.
    Returns the model (an fx GraphModule where fx traces it), or ``(model, counts)`` with ``return_report``:
    {"conv", "bn", "relu", "pool", "residual", "skipped", "max_pool", "why"} ("why": "" unless fx cannot trace
    the model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    from ..compare.variants import fuse_pruned_convs, pyprune_pools

    args = None
    if example_inputs is not None:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out, counts = fuse_pruned_convs(model, args)
    counts["max_pool"] = pyprune_pools(out)
    out.train(model.training)
    return (out, counts) if return_report else out


__all__ = [
    "ConvertReport", "LAYOUTS", "convert", "plain_encoder_inputs", "to_pruned_convs", "weight_read_directly",
]  # fmt: skip
