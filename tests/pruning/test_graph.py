"""Dependency graph: coupled groups for concat/split/depthwise/grouped/flatten/attention, and clear errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune
from pyprune import models
from pyprune.pruning import (
    PrunedMultiheadAttention,
    PruningError,
    UnsupportedPatternError,
    build_graph,
    plan_pruning,
)


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.d = nn.Conv2d(3, 5, 1)
        self.e = nn.Conv2d(3, 5, 1)
        self.fc = nn.Linear(8 * 4 * 4 + 5, 3)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        z = self.d(x) * torch.sigmoid(self.e(x))  # gating couples d and e
        flat = torch.flatten(F.adaptive_avg_pool2d(self.c(y), 4), 1)
        return self.fc(torch.cat([flat, z.mean((2, 3))], dim=1))


def _group(graph, producer):
    gs = [g for g in graph.groups if producer in g.producers]
    assert len(gs) == 1
    return gs[0]


def test_concat_members_carry_offsets_and_flatten_expands_positions():
    m = ConcatNet().eval()
    graph = build_graph(m, (torch.randn(2, 3, 8, 8),))
    ga, gb = _group(graph, "a"), _group(graph, "b")
    c_in_a = [x for x in ga.members if x.module == "c"][0]
    c_in_b = [x for x in gb.members if x.module == "c"][0]
    assert (c_in_a.dim, c_in_a.offset, c_in_a.role) == (1, 0, "in")
    assert c_in_b.offset == 4
    assert {x.module for x in gb.members} == {"b", "bn", "c"}
    fc_in_c = [x for x in _group(graph, "c").members if x.module == "fc"][0]
    assert (fc_in_c.dim, fc_in_c.inner) == (1, 16)  # each channel of c covers 4*4 flattened features
    assert _group(graph, "d") is _group(graph, "e")
    assert _group(graph, "d").members[-1].offset == 8 * 16  # fc reads z after the 128 flattened features


def test_concat_pruning_is_exact(exactness):
    pruned, plan = exactness(ConcatNet(), torch.randn(2, 3, 8, 8), ratio=0.5, protect_first_last=False)
    assert (pruned.a.out_channels, pruned.b.out_channels, pruned.bn.num_features) == (2, 3, 5)
    assert pruned.c.in_channels == 5 and pruned.fc.in_features == 4 * 16 + 3
    assert pruned.d.out_channels == pruned.e.out_channels == 3


class DepthwiseGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise with channel multiplier 2
        self.grouped = nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(F.relu(self.grouped(F.relu(self.dw(F.relu(self.pw(x)))))))


def test_depthwise_follows_its_input_and_grouped_conv_is_kept(exactness):
    m = DepthwiseGrouped()
    x = torch.randn(2, 3, 6, 6)
    graph = build_graph(m.eval(), (x,))
    g = _group(graph, "pw")
    dw_member = [x_ for x_ in g.members if x_.module == "dw" and x_.tensor == "weight"][0]
    assert (dw_member.role, dw_member.inner) == ("out", 2)
    assert g.pinned and "grouped conv" in g.pinned[0]  # dw output feeds the grouped conv
    assert any("grouped conv" in p for p in _group(graph, "grouped").pinned)
    # Without the grouped conv in the way, depthwise channels prune together with pw.
    m2 = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )
    pruned, _ = exactness(m2, x, ratio=0.5, protect_first_last=False)
    assert (pruned[0].out_channels, pruned[2].in_channels, pruned[2].groups, pruned[2].out_channels) == (
        4,
        4,
        4,
        8,
    )
    assert pruned[4].in_channels == 8


class MHABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


def test_multihead_attention_heads_prune_exactly(exactness):
    x = torch.randn(2, 5, 12)
    pruned, plan = exactness(MHABlock(), x, ratio=0.5, ignore=["emb"], protect_first_last=False)
    assert isinstance(pruned.attn, PrunedMultiheadAttention)
    assert pruned.attn.num_heads == 2 and pruned.attn.in_proj_weight.shape == (3 * 16, 32)
    assert pruned.attn.out_proj.weight.shape == (32, 16) and pruned.fc1.out_features == 32
    heads = [g for g in plan.groups if g.channels == 4]
    assert len(heads) == 1 and heads[0].keep == 2


def test_multihead_attention_stream_prunes_too():
    x = torch.randn(2, 5, 12)
    pruned = pyprune.prune_channels(MHABlock().eval(), x, ratio=0.5, protect_first_last=False)
    assert pruned.emb.out_features == 16 and pruned.attn.in_proj_weight.shape == (3 * 16, 16)
    assert pruned.head.in_features == 16 and pruned(x).shape == (2, 3)


def test_pruned_mha_matches_torch_mha_before_pruning():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    mine = PrunedMultiheadAttention.from_module(mha).eval()
    q = torch.randn(2, 5, 16)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    ref_out, ref_w = mha(q, q, q, key_padding_mask=kpm)
    out, w = mine(q, q, q, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    torch.testing.assert_close(
        mine(q, q, q, attn_mask=causal)[0], mha(q, q, q, attn_mask=causal)[0], rtol=1e-5, atol=1e-6
    )


def test_transformer_groups_heads_mlp_and_layernorm():
    m = models.bert("small", vocab_size=50).eval()
    graph = build_graph(m, (torch.randint(0, 50, (1, 6)),))
    heads = _group(graph, "encoder.layer.0.attention.self.query")
    assert heads.channels == 8
    dense_in = [x for x in heads.members if x.module == "encoder.layer.0.attention.output.dense"][0]
    assert dense_in.inner == 64 and dense_in.role == "in"
    mlp = _group(graph, "encoder.layer.0.intermediate.dense")
    assert mlp.channels == 2048 and not mlp.pinned
    stream = _group(graph, "embeddings.word_embeddings")
    assert "model output" in stream.pinned
    assert any(x.module == "encoder.layer.2.output.LayerNorm" for x in stream.members)


def test_vit_class_token_and_position_embedding_join_the_stream():
    m = models.vit_small(num_classes=3, img_size=32).eval()
    graph = build_graph(m, (torch.randn(1, 3, 32, 32),))
    stream = _group(graph, "patch_embed.proj")
    tensors = {(x.module, x.tensor, x.dim) for x in stream.members}
    assert ("", "cls_token", 2) in tensors and ("", "pos_embed", 2) in tensors
    pruned = pyprune.prune_channels(m, torch.randn(1, 3, 32, 32), ratio=0.5, protect_first_last=False)
    assert pruned.cls_token.shape == (1, 1, 192) and pruned.pos_embed.shape == (1, 5, 192)
    assert pruned.blocks[0].attn.num_heads == 3 and pruned(torch.randn(2, 3, 32, 32)).shape == (2, 3)


class CumsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cumsum(self.conv(x), dim=1))


def test_unsupported_op_names_the_node_and_ignore_resolves_it():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(UnsupportedPatternError, match=r"cumsum.*ignore=\[\.\.\.\].*'conv'"):
        pyprune.prune_channels(CumsumNet(), x, protect_first_last=False)
    plan = pyprune.prune_channels(CumsumNet(), x, protect_first_last=False, ignore=["conv"], dry_run=True)
    assert plan.removed_channels == 0 and all(g.pinned for g in plan.groups)


class SplitInsideGroup(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(4, 2, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        u, v = self.conv(x).chunk(2, dim=1)
        return self.a(u) + self.b(v)


def test_channel_split_keeps_its_fixed_sizes():
    x = torch.randn(1, 3, 4, 4)
    plan = pyprune.prune_channels(SplitInsideGroup(), x, protect_first_last=False, dry_run=True)
    conv_group = [g for g in plan.groups if "conv" in g.layers][0]
    assert conv_group.keep == 8 and "chunk along the channel dim" in conv_group.pinned[0]
    pruned = pyprune.prune_channels(SplitInsideGroup(), x, protect_first_last=False)
    assert pruned.conv.out_channels == 8 and pruned(x).shape == (1, 2, 4, 4)


class FixedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8 * 16, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 128))


def test_reshape_with_a_literal_channel_size_is_pinned():
    plan = pyprune.prune_channels(
        FixedView(), torch.randn(2, 3, 4, 4), protect_first_last=False, dry_run=True
    )
    assert "fixed size 128" in plan.groups[0].pinned[0] and plan.removed_channels == 0


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


def test_untraceable_model_raises_a_clear_error():
    with pytest.raises(PruningError, match="could not trace.*ignore="):
        pyprune.prune_channels(Untraceable(), torch.randn(1, 3, 4, 4))
    assert issubclass(PruningError, ValueError)


def test_plan_lists_pinned_groups_with_reasons():
    _, plan, _ = plan_pruning(models.lenet5().eval(), torch.randn(1, 1, 32, 32), ratio=0.5)
    text = str(plan)
    assert "first layer conv1" in text and "model output" in text
    assert [g.keep for g in plan.groups] == [6, 8, 60, 84, 10]


def test_pruned_attention_can_be_pruned_again():
    x = torch.randn(2, 5, 12)
    once = pyprune.prune_channels(MHABlock().eval(), x, ratio=0.5, protect_first_last=False)
    twice = pyprune.prune_channels(once, x, ratio=0.5, protect_first_last=False)
    assert (once.attn.num_heads, twice.attn.num_heads) == (2, 1)
    assert twice.emb.out_features == 8 and twice(x).shape == (2, 3)


class TorchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.enc(self.proj(x)))


def test_opaque_torch_transformer_is_named_and_can_be_ignored():
    x = torch.randn(2, 5, 8)
    with pytest.raises(UnsupportedPatternError, match=r"node 'enc'.*TransformerEncoder.*'proj'"):
        pyprune.prune_channels(TorchEncoder().eval(), x, protect_first_last=False)
    plan = pyprune.prune_channels(
        TorchEncoder().eval(), x, protect_first_last=False, ignore=["enc"], dry_run=True
    )
    assert plan.removed_channels == 0 and "ignored module enc" in str(plan)


class PlainNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.ln = nn.LayerNorm(32, elementwise_affine=False)
        self.c = nn.Conv1d(32, 16, 1)
        self.bn = nn.BatchNorm1d(16, affine=False, track_running_stats=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.ln(self.a(x)))  # (N, L, 32)
        return self.head(F.relu(self.bn(self.c(h.transpose(1, 2)))).mean(2))


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_norms_without_tensors_follow_the_pruned_channels(importance):
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    graph = build_graph(PlainNorms().eval(), (x,))
    listed = {(m.module, m.tensor, m.dim, m.role) for m in _group(graph, "a").members}
    assert ("ln", None, 0, "norm") in listed  # no tensor to slice, but listed so its size follows
    kwargs = dict(importance=importance, data=[(x, y)], loss_fn=F.cross_entropy, protect_first_last=False)
    pruned = pyprune.prune_channels(PlainNorms(), x, ratio=0.5, **kwargs)
    assert pruned.ln.normalized_shape == (pruned.a.out_features,) == (16,)
    assert pruned.bn.num_features == pruned.c.out_channels == 8
    assert pruned(x).shape == (4, 3)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.c0(x))
        x = F.relu(self.c(x))
        x = F.relu(self.c(x))  # the same module again: its input and output channels are one set
        return self.fc(x.mean((2, 3)))


class SharedByTwoProducers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = F.relu(self.c(F.relu(self.a(x)))) * F.relu(self.c(F.relu(self.b(x))))
        return self.fc(y.mean((2, 3)))


def test_module_called_twice_prunes_consistently(exactness):
    x = torch.randn(2, 3, 8, 8)
    pruned, _ = exactness(SharedConv(), x, ratio=0.5, protect_first_last=False)
    assert pruned.c0.out_channels == 4 and pruned.c.weight.shape == (4, 4, 3, 3)
    pruned, _ = exactness(SharedByTwoProducers(), x, ratio=0.5, protect_first_last=False)
    assert pruned.a.out_channels == pruned.b.out_channels == pruned.c.in_channels == 4
    assert pruned.c.out_channels == 3 and pruned.fc.in_features == 3


class SharedOnFixedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.s = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(F.relu(self.s(x)) + F.relu(self.s(F.relu(self.a(x)))))  # s also reads the input


def test_module_called_once_on_fixed_channels_keeps_its_inputs(exactness):
    pruned, plan = exactness(SharedOnFixedInput(), torch.randn(2, 8), ratio=0.5, protect_first_last=False)
    assert pruned.s.in_features == pruned.a.out_features == 8 and pruned.s.out_features == 4
    assert any("s is called more than once" in p for g in plan.groups for p in g.pinned)


class SharedOnDifferentLayouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 10)
        self.x = nn.Linear(4, 16)
        self.s = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.s(torch.cat([self.a(x), self.b(x)], -1)) + self.s(self.x(x)))


def test_module_called_on_differently_laid_out_channels_names_it_and_ignore_resolves_it():
    x = torch.randn(2, 4)
    with pytest.raises(UnsupportedPatternError, match=r"s\.weight is used more than once.*ignore=\[\.\.\.\]"):
        pyprune.prune_channels(SharedOnDifferentLayouts(), x, protect_first_last=False)
    pruned = pyprune.prune_channels(SharedOnDifferentLayouts(), x, protect_first_last=False, ignore=["s"])
    assert pruned.s.weight.shape == (16, 16) and pruned(x).shape == (2, 2)


class MaskPerHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x, mask):
        h = self.emb(x)
        return self.head((h + self.attn(h, h, h, attn_mask=mask)[0]).mean(1))


def test_3d_attention_mask_keeps_the_heads(exactness):
    mask = torch.zeros(2 * 4, 5, 5, dtype=torch.bool)  # (N * num_heads, L, S)
    mask[:, :, 4] = True
    pruned, plan = exactness(MaskPerHead(), (torch.randn(2, 5, 8), mask), ratio=0.5, protect_first_last=False)
    assert pruned.attn.num_heads == 4 and pruned.attn.in_proj_weight.shape == (3 * 32, 16)
    heads = [g for g in plan.groups if g.channels == 4]
    assert len(heads) == 1 and heads[0].keep == 4 and "3-D attn_mask" in heads[0].pinned[0]


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.aux = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = F.relu(self.b(F.relu(self.a(x))))
        return {"aux": self.aux(h), "feat": h}


def test_outputs_inside_a_dict_keep_their_channels():
    x = torch.randn(2, 3, 8, 8)
    plan = pyprune.prune_channels(DictOutput(), x, ratio=0.5, protect_first_last=False, dry_run=True)
    pinned = {layer for g in plan.groups if g.pinned for layer in g.layers}
    assert {"aux", "b"} <= pinned
    pruned = pyprune.prune_channels(DictOutput(), x, ratio=0.5, protect_first_last=False)
    out = pruned(x)
    assert out["aux"].shape == (2, 4, 8, 8) and out["feat"].shape == (2, 6, 8, 8)
    assert pruned.a.out_channels == 4


class TensorAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 2, 1)
        self.scale = torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1)  # a plain attribute, not a buffer

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)) * self.scale)


def test_plain_tensor_attribute_is_sliced_and_stays_an_attribute(exactness):
    pruned, _ = exactness(TensorAttribute(), torch.randn(2, 3, 8, 8), ratio=0.5, protect_first_last=False)
    assert pruned.scale.shape == (1, 4, 1, 1) and dict(pruned.named_buffers()) == {}


class GlobalMax(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.c1(x)).flatten(2)
        if self.op == "max":
            h = h.max(dim=2)[0]
        elif self.op == "median":
            h = torch.median(h, 2, True).values.squeeze(2)
        else:  # top-2 locations of each channel, the best one
            h = h.topk(2, dim=-1).values.sort(dim=-1, descending=True).values[..., 0]
        return self.fc(h)


@pytest.mark.parametrize("op", ["max", "median", "topk"])
def test_values_of_max_and_sort_keep_the_channels(exactness, op):
    pruned, _ = exactness(GlobalMax(op), torch.randn(2, 3, 8, 8), ratio=0.5, protect_first_last=False)
    assert pruned.c1.out_channels == 4 and pruned.fc.in_features == 4


class ChannelMaxAfterMax(nn.Module):
    def __init__(self, over_channels_first):
        super().__init__()
        self.over_channels_first = over_channels_first
        self.c0 = nn.Conv2d(3, 3, 1)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.c1(self.c0(x)))
        if self.over_channels_first:
            return torch.max(h, 1).values
        return h.max(dim=3).values.mean(1)


@pytest.mark.parametrize("over_channels_first", [True, False])
def test_reduction_over_channels_through_max_values_is_rejected(over_channels_first):
    with pytest.raises(UnsupportedPatternError, match="reduction over the channel dim"):
        pyprune.prune_channels(ChannelMaxAfterMax(over_channels_first), torch.randn(2, 3, 8, 8))


class MatrixTranspose(nn.Module):
    def __init__(self, attr):
        super().__init__()
        self.attr = attr
        self.l1 = nn.Linear(3, 8)
        self.l2 = nn.Linear(8, 2)

    def forward(self, x):  # x: (N, 4, 3)
        h = F.relu(self.l1(x))
        if self.attr == "mT":
            return self.l2(h.mT.mT)
        return self.l2(h[0].T.T)


@pytest.mark.parametrize("attr", ["mT", "T"])
def test_transpose_attributes_move_the_channel_dim(exactness, attr):
    pruned, _ = exactness(MatrixTranspose(attr), torch.randn(2, 4, 3), ratio=0.5, protect_first_last=False)
    assert pruned.l2.in_features == 4


class TransposedToChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 8)
        self.l2 = nn.Linear(4, 2)

    def forward(self, x):  # x: (N, 4, 3); l2 reads the 4 tokens, not l1's channels
        return self.l2(F.relu(self.l1(x)).mT)


def test_transpose_attribute_that_moves_channels_away_from_the_consumer_is_rejected():
    with pytest.raises(UnsupportedPatternError, match="Linear l2 reads the last dim"):
        pyprune.prune_channels(TransposedToChannels(), torch.randn(2, 4, 3), protect_first_last=False)


class UnsqueezedScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 2, 1)
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(8, 1))  # per-channel scale stored as (C, 1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)) * self.g.unsqueeze(-1))


def test_parameter_reshaped_before_broadcasting_is_sliced_on_its_channel_dim(exactness):
    pruned, _ = exactness(UnsqueezedScale(), torch.randn(2, 3, 8, 8), ratio=0.5, protect_first_last=False)
    assert pruned.g.shape == (4, 1)


class SpatialAttention(nn.Module):
    def __init__(self, map_first):
        super().__init__()
        self.map_first = map_first
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.sa = nn.Conv2d(3, 1, 3, padding=1)
        self.c2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y, a = F.relu(self.c1(x)), torch.sigmoid(self.sa(x))  # a: (N, 1, H, W)
        return self.c2(a * y if self.map_first else y * a)


@pytest.mark.parametrize("map_first", [True, False])
def test_one_channel_map_broadcasts_in_either_order(exactness, map_first):
    pruned, _ = exactness(SpatialAttention(map_first), torch.randn(2, 3, 8, 8), protect_first_last=False)
    assert pruned.c1.out_channels == 4 and pruned.c2.in_channels == 4 and pruned.sa.out_channels == 1


def test_pruned_mha_keeps_the_dtype_and_device_of_the_module_it_replaces():
    for dtype in (torch.float64, torch.bfloat16):
        mha = nn.MultiheadAttention(16, 4, batch_first=True, dtype=dtype)
        assert {p.dtype for p in PrunedMultiheadAttention.from_module(mha).parameters()} == {dtype}
    meta = PrunedMultiheadAttention.from_module(nn.MultiheadAttention(16, 4, device="meta"))
    assert all(p.is_meta for p in meta.parameters())
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    pruned = pyprune.prune_channels(MHABlock().double().eval(), x, ratio=0.5, protect_first_last=False)
    assert pruned.attn.in_proj_weight.dtype == torch.float64 and pruned(x).dtype == torch.float64
