"""PrunedConv2d: a drop-in nn.Conv2d that reads only the kept input channels of its (unpruned) input and
computes only the kept output channels, through pyprune::pruned_conv2d."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.pruned_conv2d import check_channel_index, check_pool, check_relu_max, pair, pool_list
from ._bn import bn_affine
from ._dtype import weight_dtype_input
from ._trainable import copy_requires_grad, trains


def _index(idx, n: int, name: str, device) -> Tensor | None:
    """None (keep all n) or a sorted, unique int64 index tensor; rejects anything else by name."""
    if idx is None:
        return None
    if isinstance(idx, Tensor):
        if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor (or a list of ints), got {idx.dtype} "
                            f"of shape {tuple(idx.shape)}")  # fmt: skip
        # a copy: the module must not follow later writes into the caller's tensor (the weight is sliced once)
        t = idx.detach().to(device=device, dtype=torch.int64, copy=True)
    else:
        idx = list(idx)
        if not all(isinstance(i, int) for i in idx):
            raise TypeError(f"{name} must be a sequence of ints, got {idx!r}")
        t = torch.tensor(idx, dtype=torch.int64, device=device)
    if t.numel() == 0:
        raise ValueError(f"{name} must keep at least one channel")
    if t.device.type != "meta":  # the meta device holds no values to check
        check_channel_index(t, n, name)
    return t


def fusable_max_pool(pool: nn.Module) -> bool:
    """Whether PrunedConv2d can fuse ``pool``: an nn.MaxPool2d with dilation 1, floor mode, no indices."""
    return (
        isinstance(pool, nn.MaxPool2d) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
        and not pool.return_indices
    )  # fmt: skip


def _any_trains(params) -> bool | None:
    """Whether any of the (module, name) parameters requires grad; None if none of them exists."""
    flags = [f for f in (trains(m, name) for m, name in params) if f is not None]
    return any(flags) if flags else None


class PrunedConv2d(nn.Module):
    """``relu?(conv2d(x[:, keep_in], weight, bias))``, the output compact ``(N, len(keep_out), OH, OW)`` or,
    with ``scatter_output=True``, scattered into ``(N, out_channels, OH, OW)`` with zeros elsewhere; with
    ``max_pool=(kernel_size, stride, padding)``, max-pooled after that (dilation 1, floor mode). With
    ``relu_max`` the ReLU is capped there (``relu_max=6``: ReLU6, as in MobileNetV2). ``module(x, residual)``
    adds ``residual`` (the output's shape; not with ``max_pool``) before the ReLU: a ResNet block's last conv,
    its skip connection and the ReLU after the sum as one op.

    Build it with :meth:`from_dense`. ``weight`` (a Parameter) holds only the kept rows and columns;
    ``in_index`` / ``out_index`` are buffers (``None`` when everything is kept)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        keep_in: Sequence[int] | Tensor | None = None,
        keep_out: Sequence[int] | Tensor | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        relu: bool = False,
        scatter_output: bool = False,
        max_pool: Sequence | None = None,
        device=None,
        dtype=None,
        relu_max: float | None = None,
    ):
        super().__init__()
        check_relu_max(relu, relu_max, "relu_max")  # here, not at the first call
        self.relu_max = None if relu_max is None else float(relu_max)
        pool = pool_list(max_pool)
        if pool:
            check_pool(pool)  # here, not at the first call
        self.max_pool = None if not pool else (tuple(pool[:2]), tuple(pool[2:4]), tuple(pool[4:]))
        kh, kw = pair(kernel_size, "kernel_size")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (kh, kw)
        self.stride = tuple(pair(stride, "stride"))
        self.padding = tuple(pair(padding, "padding"))
        self.dilation = tuple(pair(dilation, "dilation"))
        self.groups, self.relu, self.scatter_output = int(groups), bool(relu), bool(scatter_output)
        in_index = _index(keep_in, self.in_channels, "keep_in", device)
        out_index = _index(keep_out, self.out_channels, "keep_out", device)
        c_in = self.in_channels if in_index is None else in_index.numel()
        c_out = self.out_channels if out_index is None else out_index.numel()
        if c_in % self.groups or c_out % self.groups:
            raise ValueError(
                f"groups ({self.groups}) must divide the kept input ({c_in}) and output ({c_out}) channels"
            )
        dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(
            torch.zeros(c_out, c_in // self.groups, kh, kw, device=device, dtype=dtype)
        )
        self.bias = nn.Parameter(torch.zeros(c_out, device=device, dtype=dtype)) if bias else None
        self.register_buffer("in_index", in_index)
        self.register_buffer("out_index", out_index)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        keep_in: Sequence[int] | Tensor | None = None,
        keep_out: Sequence[int] | Tensor | None = None,
        bn: nn.BatchNorm2d | None = None,
        relu: bool = False,
        scatter_output: bool = False,
        max_pool: nn.MaxPool2d | None = None,
        relu_max: float | None = None,
    ) -> PrunedConv2d:
        """Keeps ``conv``'s weight rows ``keep_out`` and input channels ``keep_in`` (sorted unique indices, None =
        all). ``bn`` (eval-mode statistics) is folded into the weight and bias; ``relu`` fuses a ReLU after
        it, capped at ``relu_max`` if given (6: ReLU6); ``max_pool`` (dilation 1, floor mode, no indices
        returned) fuses that pool after everything else.
        Depthwise convs (groups == in_channels == out_channels) need keep_in == keep_out."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        pool = None
        if max_pool is not None:
            if not isinstance(max_pool, nn.MaxPool2d):
                got = type(max_pool).__name__
                raise TypeError(f"max_pool must be a torch.nn.MaxPool2d or None, got {got}")
            if not fusable_max_pool(max_pool):
                raise ValueError(
                    "max_pool must have dilation 1, ceil_mode=False and return_indices=False, got "
                    f"dilation={max_pool.dilation}, ceil_mode={max_pool.ceil_mode}, "
                    f"return_indices={max_pool.return_indices}"
                )
            stride = max_pool.kernel_size if max_pool.stride is None else max_pool.stride
            pool = (max_pool.kernel_size, stride, max_pool.padding)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"conv must use numeric zero padding, got padding={conv.padding!r} "
                             f"padding_mode={conv.padding_mode!r}")  # fmt: skip
        w = conv.weight.detach()
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, keep_in, keep_out, conv.stride, conv.padding,
            conv.dilation, 1, bias=conv.bias is not None or bn is not None, relu=relu,
            scatter_output=scatter_output, max_pool=pool, device=w.device, dtype=w.dtype, relu_max=relu_max,
        )  # fmt: skip
        g = new.groups = conv.groups
        rows = torch.arange(conv.out_channels, device=w.device) if new.out_index is None else new.out_index
        cols = torch.arange(conv.in_channels, device=w.device) if new.in_index is None else new.in_index
        if g == 1:
            weight = w[rows][:, cols]
        else:
            # groups that keep nothing drop out; the others must keep the same number of inputs and outputs
            per_in, per_out = conv.in_channels // g, conv.out_channels // g
            g_in, g_out = cols // per_in, rows // per_out
            counts_in = torch.bincount(g_in, minlength=g)
            counts_out = torch.bincount(g_out, minlength=g)
            live = counts_out > 0
            if (
                not torch.equal(live, counts_in > 0)
                or len(set(counts_in[live].tolist())) != 1
                or len(set(counts_out[live].tolist())) != 1
            ):
                raise ValueError(
                    f"a grouped conv (groups={g}) must keep inputs exactly in the groups it keeps outputs "
                    f"in, the same number in each; keep_in gives {counts_in.tolist()} per group, keep_out "
                    f"gives {counts_out.tolist()}"
                )
            new.groups = int(live.sum())
            local_in = (cols % per_in).reshape(new.groups, -1)
            kept = live.nonzero().flatten().tolist()
            weight = torch.cat([w[rows[g_out == grp]][:, local_in[i]] for i, grp in enumerate(kept)])
        weight = weight.clone()
        bias = conv.bias.detach()[rows].clone() if conv.bias is not None else None
        if bn is not None:
            scale, shift = bn_affine(bn, conv.out_channels)
            s = scale[rows]
            weight = weight * s.reshape(-1, 1, 1, 1).to(weight.dtype)
            b0 = bias if bias is not None else torch.zeros_like(s)
            bias = (b0 * s + shift[rows]).to(weight.dtype)
        with torch.no_grad():
            new.weight.data = weight.contiguous()
            if new.bias is not None:
                new.bias.data = bias.contiguous()
        # a frozen conv stays frozen (its weight, even with a trainable BN's scale folded in: the per-channel
        # capacity a BN-only fine-tune trains lives on in the bias); the bias trains if a parameter it is folded
        # from does
        new.weight.requires_grad_(trains(conv, "weight"))
        if new.bias is not None:
            flag = _any_trains([(conv, "bias"), *([(bn, "weight"), (bn, "bias")] if bn is not None else [])])
            new.bias.requires_grad_(trains(conv, "weight") if flag is None else flag)
        return new

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if not isinstance(input, Tensor) or input.dim() != 4 or input.shape[1] != self.in_channels:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"input must have shape (N, in_channels={self.in_channels}, H, W), got {shape}")
        # parameters and buffers straight from their dicts: a module's __getattr__ costs ~1.3 us a read on
        # the Xeon VM, a sizeable share of a small conv's call. A parametrized or torch.nn.utils.prune'd
        # weight is no longer in _parameters: then the attribute, which computes it.
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        if input.dtype != weight.dtype:
            input = weight_dtype_input(input, weight.dtype)
        if residual is not None and residual.dtype != weight.dtype:
            residual = weight_dtype_input(residual, weight.dtype)
        scatter = self.scatter_output
        return ops.pruned_conv2d(
            input, weight, bias, buffers["in_index"], buffers["out_index"] if scatter else None,
            self.out_channels if scatter else weight.shape[0],
            self.stride, self.padding, self.dilation, self.groups, self.relu, self.max_pool, self.relu_max,
            residual,
        )  # fmt: skip

    def to_dense(self) -> nn.Sequential:
        """An equivalent plain-PyTorch module: index_select -> nn.Conv2d -> (ReLU, or ReLU6 / Hardtanh(0,
        relu_max)) -> (scatter) -> (max pool); of calls without a residual (a ReLU applies to the sum)."""
        w = self.weight
        conv = nn.Conv2d(w.shape[1] * self.groups, w.shape[0], self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None, device=w.device, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        copy_requires_grad(conv, self)
        layers = [_SelectChannels(self.in_index)] if self.in_index is not None else []
        layers.append(conv)
        if self.relu_max == 6.0:
            layers.append(nn.ReLU6())
        elif self.relu_max is not None:
            layers.append(nn.Hardtanh(0.0, self.relu_max))
        elif self.relu:
            layers.append(nn.ReLU())
        if self.scatter_output and self.out_index is not None:
            layers.append(_ScatterChannels(self.out_index, self.out_channels))
        if self.max_pool is not None:
            layers.append(nn.MaxPool2d(*self.max_pool))
        return nn.Sequential(*layers)

    def extra_repr(self) -> str:
        c_in, c_out = self.weight.shape[1] * self.groups, self.weight.shape[0]
        s = (f"{self.in_channels}->{self.out_channels} keeping {c_in}->{c_out}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")  # fmt: skip
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.relu:
            s += ", relu=True"
        if self.relu_max is not None:
            s += f", relu_max={self.relu_max}"
        if self.scatter_output:
            s += ", scatter_output=True"
        if self.max_pool is not None:
            s += f", max_pool={self.max_pool}"
        return s


class _SelectChannels(nn.Module):
    def __init__(self, index: Tensor):
        super().__init__()
        self.register_buffer("index", index.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)


class _ScatterChannels(nn.Module):
    def __init__(self, index: Tensor, channels: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("index", index.clone())

    def forward(self, y: Tensor) -> Tensor:
        full = y.new_zeros(y.shape[0], self.channels, *y.shape[2:])
        return full.index_copy(1, self.index, y)
