"""Attention modules as single nodes of the dependency graph: their heads form one channel group each.

Supported: ``nn.MultiheadAttention`` (self-attention, q/k/v of equal width, no bias_k/bias_v), the zoo's
``BertSelfAttention`` (separate query/key/value) and ViT ``Attention`` (fused qkv). ``nn.MultiheadAttention``
ties its inner width to its input width, so once heads or input channels are pruned it is replaced by
:class:`PrunedMultiheadAttention`, which keeps the same parameter names (in_proj_weight, in_proj_bias,
out_proj.*) and call signature.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..models.bert import BertSelfAttention
from ..models.vit import Attention as VitAttention
from .graph import ChInfo, Member, Seg, _Builder, register_fixup, register_leaf


class PrunedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention whose inner width ``num_heads * head_dim`` may differ from ``embed_dim``.

    query: (L, N, E) or (N, L, E) if batch_first; key/value: (S, N, E)
    -> (output (..., E_out), attention weights or None).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        out_dim: int,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        like = {"device": device, "dtype": dtype}
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **like))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **like)) if bias else None
        self.out_proj = nn.Linear(inner, out_dim, bias=bias, **like)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_module(cls, m: nn.Module) -> "PrunedMultiheadAttention":
        head_dim = m.head_dim
        new = cls(
            m.in_proj_weight.shape[1],
            m.in_proj_weight.shape[0] // (3 * head_dim),
            head_dim,
            m.out_proj.weight.shape[0],
            m.in_proj_bias is not None,
            m.batch_first,
            m.dropout,
            device=m.in_proj_weight.device,
            dtype=m.in_proj_weight.dtype,
        )
        new.load_state_dict(m.state_dict())
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, _ = query.shape
        S = key.shape[0]
        inner = self.num_heads * self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.split(inner)
        b_q, b_k, b_v = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None,) * 3

        def heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, n: int) -> torch.Tensor:
            return F.linear(x, w, b).reshape(n, N, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(query, w_q, b_q, L), heads(key, w_k, b_k, S), heads(value, w_v, b_v, S)
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5  # (N, H, L, S)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            attn_mask = attn_mask.view(N, self.num_heads, L, S) if attn_mask.dim() == 3 else attn_mask
            scores = (
                scores.masked_fill(attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else scores + attn_mask
            )
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = scores.softmax(-1)
        probs = F.dropout(attn, self.dropout, self.training)
        ctx = (probs @ v).permute(2, 0, 1, 3).reshape(L, N, inner)
        out = self.out_proj(ctx)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(1) if average_attn_weights else attn


def _in_members(b: _Builder, n: fx.Node, x: Any, out: torch.Tensor, module: str, tensors: list[str]) -> None:
    if not isinstance(x, ChInfo):
        return
    if x.dim != out.dim() - 1:
        b.problem(n, x, f"attention {module} reads channels from the last dim, found them on dim {x.dim}")
        return
    for t in tensors:
        mod, _, name = t.rpartition(".")
        b.add_members(x, f"{module}.{mod}" if mod else module, name, 1, "in")


def _out_space(b: _Builder, name: str, linear: nn.Linear, out: torch.Tensor) -> ChInfo:
    s = b.new_space(linear.out_features, name)
    b.attach(s, Member(name, "weight", 0, "out"))
    if linear.bias is not None:
        b.attach(s, Member(name, "bias", 0, "out"))
    return ChInfo(out.dim() - 1, (Seg(s, linear.out_features),))


def _bert_self(
    b: _Builder, n: fx.Node, name: str, m: BertSelfAttention, infos: list, out: torch.Tensor
) -> ChInfo:
    _in_members(b, n, infos[0], out, name, ["query.weight", "key.weight", "value.weight"])
    hd, h = m.attention_head_size, m.num_attention_heads
    s = b.new_space(h, f"{name} (heads)")
    for p in ("query", "key", "value"):
        lin = getattr(m, p)
        b.attach(s, Member(f"{name}.{p}", "weight", 0, "out", inner=hd))
        if lin.bias is not None:
            b.attach(s, Member(f"{name}.{p}", "bias", 0, "out", inner=hd))
    return ChInfo(out.dim() - 1, (Seg(s, h, hd),))


def _fused_heads(b: _Builder, name: str, qkv: str, qkv_bias: bool, proj: str, h: int, hd: int) -> int:
    """Declare the heads space of a fused q/k/v projection and return it."""
    s = b.new_space(h, f"{name} (heads)")
    stride = h * hd
    mod, _, w = qkv.rpartition(".")
    owner = f"{name}.{mod}" if mod else name
    b.attach(s, Member(owner, w, 0, "out", inner=hd, blocks=3, block_stride=stride))
    if qkv_bias:
        bias = "bias" if mod else "in_proj_bias"
        b.attach(s, Member(owner, bias, 0, "out", inner=hd, blocks=3, block_stride=stride))
    b.attach(s, Member(f"{name}.{proj}", "weight", 1, "in", inner=hd))
    return s


def _vit_attn(b: _Builder, n: fx.Node, name: str, m: VitAttention, infos: list, out: torch.Tensor) -> ChInfo:
    _in_members(b, n, infos[0], out, name, ["qkv.weight"])
    _fused_heads(b, name, "qkv.weight", m.qkv.bias is not None, "proj", m.num_heads, m.head_dim)
    return _out_space(b, f"{name}.proj", m.proj, out)


def _mha(b: _Builder, n: fx.Node, name: str, m: nn.Module, infos: list, out: Any) -> list:
    q_node = n.args[0] if n.args else n.kwargs.get("query")
    kv_nodes = [n.args[i] if len(n.args) > i else n.kwargs.get(k) for i, k in ((1, "key"), (2, "value"))]
    x = b.info.get(q_node)
    supported = (
        getattr(m, "_qkv_same_embed_dim", True)
        and getattr(m, "bias_k", None) is None
        and not getattr(m, "add_zero_attn", False)
    )
    if not supported:
        reason = f"nn.MultiheadAttention {name} with kdim/vdim, bias_k/bias_v or add_zero_attn is kept intact"
        b.pin([b.info.get(a) for a in [q_node] + kv_nodes], reason)
        s = b.new_space(m.out_proj.out_features, name)
        b.pins[s].append(reason)
        return [ChInfo(out[0].dim() - 1, (Seg(s, m.out_proj.out_features),)), None]
    # One in_proj matrix multiplies query, key and value, so their channels are the same set.
    for other in kv_nodes:
        y = b.info.get(other)
        if isinstance(x, ChInfo) and isinstance(y, ChInfo) and y.dim == x.dim:
            for s1, s2 in zip(x.segs, y.segs):
                b.union(s1.space, s2.space, n)
        elif isinstance(x, ChInfo) or isinstance(y, ChInfo):
            b.pin([x, y], f"{name}: query and key/value come from differently sized tensors")
    _in_members(b, n, x, out[0], name, ["in_proj_weight"])
    hd = m.head_dim
    heads = _fused_heads(b, name, "in_proj_weight", m.in_proj_bias is not None, "out_proj", m.num_heads, hd)
    mask = n.kwargs.get("attn_mask", n.args[5] if len(n.args) > 5 else None)
    if isinstance(mask, fx.Node) and isinstance(b.env.get(mask), torch.Tensor) and b.env[mask].dim() == 3:
        # A 3-D mask is (N * num_heads, L, S): its head count is fixed by the caller.
        b.pins[heads].append(f"{name}: 3-D attn_mask holds one mask per head")
    return [_out_space(b, f"{name}.out_proj", m.out_proj, out[0]), None]


def _fix_bert(root: nn.Module, name: str, m: BertSelfAttention) -> None:
    m.num_attention_heads = m.query.weight.shape[0] // m.attention_head_size


def _fix_vit(root: nn.Module, name: str, m: VitAttention) -> None:
    m.num_heads = m.proj.weight.shape[1] // m.head_dim


def _fix_mha(root: nn.Module, name: str, m: nn.Module) -> None:
    if isinstance(m, PrunedMultiheadAttention):
        m.num_heads = m.out_proj.weight.shape[1] // m.head_dim
        m.embed_dim = m.in_proj_weight.shape[1]
        m.out_proj.in_features, m.out_proj.out_features = (
            m.out_proj.weight.shape[1],
            m.out_proj.weight.shape[0],
        )
        return
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape
    setattr(parent, attr, PrunedMultiheadAttention.from_module(m))


register_leaf(BertSelfAttention, _bert_self)
register_leaf(VitAttention, _vit_attn)
register_leaf(nn.MultiheadAttention, _mha)
register_leaf(PrunedMultiheadAttention, _mha)
register_fixup(BertSelfAttention, _fix_bert)
register_fixup(VitAttention, _fix_vit)
register_fixup(nn.MultiheadAttention, _fix_mha)
register_fixup(PrunedMultiheadAttention, _fix_mha)
