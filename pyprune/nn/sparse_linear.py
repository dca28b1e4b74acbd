"""SparseLinear: a drop-in nn.Linear whose weight is stored CSR, BSR or 2:4 and multiplied by pyprune's
kernels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..sparse import BSR, CSR, Sparse24
from ..sparse.bsr import check_block
from ..sparse.select import block_mask, magnitude_mask, nm_mask
from ._dtype import weight_dtype_input
from ._trainable import copy_requires_grad, trains

LAYOUTS = ("csr", "bsr", "2:4")


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_stored_shape(state_dict, prefix: str, want: tuple[int, int], what: str) -> None:
    """Refuse a state_dict whose weight has another dense shape than ``want`` (named ``what``). Raised from
    the owning module's own load, which runs before its weight's: a refused load leaves the module as it was
    (the weight adopts the stored sizes, as a fresh one must, see pyprune.sparse.base)."""
    shape = state_dict.get(prefix + "weight._extra_state", {}).get("shape")
    if shape is not None and tuple(shape) != want:
        raise RuntimeError(
            f"Error(s) in loading state_dict: {prefix}weight holds a {tuple(shape)} weight, this module "
            f"needs {want} ({what})"
        )


class SparseLinear(nn.Module):
    """y = x W^T + b with W sparse. Build it with :meth:`from_dense`; the constructor makes an all-zero weight
    of the right layout, which ``load_state_dict`` then fills (any nonzero count).

    Gradients flow to the input, the stored nonzeros (``weight.values``) and the bias; the sparsity pattern
    stays fixed, so a pruned model can be fine-tuned without re-densifying.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        layout: str = "csr",
        block: tuple[int, int] = (32, 32),
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_layout(layout)
        self.in_features, self.out_features, self.layout = int(in_features), int(out_features), layout
        dtype = dtype or torch.get_default_dtype()
        shape = (self.out_features, self.in_features)
        if layout == "csr":
            self.weight = CSR.empty(shape, dtype=dtype, device=device)
        elif layout == "bsr":
            self.weight = BSR.empty(shape, check_block(block), dtype=dtype, device=device)
        else:
            self.weight = Sparse24.empty(shape, dtype=dtype, device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        sparsity: float | None = None,
        layout: str = "csr",
        block: tuple[int, int] = (32, 32),
    ) -> SparseLinear:
        """With ``sparsity``, drops the smallest-magnitude weights (bsr: the smallest-norm blocks; 2:4: the two
        smallest of every four inputs, so sparsity must be 0.5); with ``sparsity=None`` keeps exactly the zeros
        already in the weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        _check_layout(layout)
        w = linear.weight.detach()
        if sparsity is not None:
            if layout == "2:4":
                if sparsity != 0.5:
                    raise ValueError(f"sparsity for layout '2:4' must be 0.5 (or None), got {sparsity!r}")
                mask = nm_mask(w, 2, 4)
            elif layout == "bsr":
                mask = block_mask(w, sparsity, check_block(block))
            else:
                mask = magnitude_mask(w, sparsity)
            w = w * mask
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.layout = linear.in_features, linear.out_features, layout
        if layout == "csr":
            new.weight = CSR.from_dense(w)
        elif layout == "bsr":
            new.weight = BSR.from_dense(w, check_block(block))
        else:
            new.weight = Sparse24.from_dense(w)
        new.weight.values.requires_grad_(trains(linear, "weight"))  # a frozen layer stays frozen
        new.bias = None
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=trains(linear, "bias"))
        return new

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"input must have shape (..., in_features={self.in_features}), got {tuple(input.shape)}"
            )
        w = self.weight  # each module attribute read once: ~0.45 us a read
        values = w.values
        if input.dtype != values.dtype:
            input = weight_dtype_input(input, values.dtype)
        if input.device != values.device:
            raise ValueError(f"input is on {input.device} but the weight is on {values.device}")
        if self.layout == "csr":
            return ops.csr_linear(input, w.crow_indices, w.col_indices, values, self.out_features, self.bias)
        if self.layout == "bsr":
            return ops.bsr_linear(input, w.crow_indices, w.col_indices, values, self.out_features, self.bias)
        return ops.sparse24_linear(input, values, w.meta, self.out_features, self.bias)

    def to_dense(self) -> nn.Linear:
        w = self.weight.to_dense()
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return copy_requires_grad(lin, self, {"weight": "weight.values", "bias": "bias"})

    def get_extra_state(self):
        return {"layout": self.layout}

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if prefix + "_extra_state" in state_dict:  # the layout first: the more specific message
            self.set_extra_state(state_dict[prefix + "_extra_state"])
        want = (self.out_features, self.in_features)
        check_stored_shape(state_dict, prefix, want, "out_features, in_features")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def set_extra_state(self, state) -> None:
        if state["layout"] != self.layout:
            raise ValueError(
                f"state_dict holds a '{state['layout']}' weight but this module's layout is '{self.layout}'"
            )

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layout={self.layout}"
        )
        if self.layout == "bsr":
            s += f", block={self.weight.block}"
        return s + f", density={self.weight.density:.3f}"
