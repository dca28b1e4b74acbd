import pytest
import torch
from torch import nn

import pyprune
from pyprune.compare import variants
from pyprune.compare.variants import Builder, NotApplicable, TorchSparseLinear, fold_bn, fuse_pruned_convs
from pyprune.compare.work import measure_work, time_layers
from pyprune.pruning import get_mask, sparsify


def test_useful_flops_linear_masked_and_sparse():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)  # 15 rows
    dense = measure_work(lin, (x,))
    assert dense["flops"] == dense["flops_executed"] == 2 * 64 * 32 * 15
    masked = pyprune.sparsify(nn.Sequential(lin), 0.75, pattern="unstructured")
    w = measure_work(masked, (x,))
    nnz = int(torch.count_nonzero(masked[0].weight))
    assert w["flops"] == 2 * nnz * 15 and w["flops_executed"] == 2 * 64 * 32 * 15
    sp = pyprune.convert(masked, layout="csr")
    s = measure_work(sp, (x,))
    assert s["flops"] == 2 * nnz * 15  # the custom op is invisible to FlopCounterMode; the hook counts it
    assert s["layers"]["0"]["kind"] == "SparseLinear"
    assert s["weight_bytes"] < w["weight_bytes"]
    assert s["bytes"] == s["weight_bytes"] + (x.numel() + 15 * 32) * 4


def test_useful_flops_conv_and_pruned_conv():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    w = measure_work(nn.Sequential(conv), (x,))
    assert w["flops"] == 2 * 8 * 4 * 9 * 2 * 36
    pc = pyprune.nn.PrunedConv2d.from_dense(conv, keep_out=[0, 2, 5])
    p = measure_work(nn.Sequential(pc), (x,))
    assert p["flops"] == 2 * 3 * 4 * 9 * 2 * 36
    times = time_layers(nn.Sequential(pc), (x,), repeats=2)
    assert set(times) == {"0"} and times["0"] > 0


def test_torch_sparse_linear_matches_dense():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0
    ts = TorchSparseLinear(lin)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(ts(x), lin(x))
    values, nbytes = ts.stored()
    assert values == int(torch.count_nonzero(lin.weight))
    assert nbytes == values * 4 + (12 + 1) * 8 + values * 8


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        return self.conv3(torch.relu(z + y))  # the ReLU after bn2 follows an add: not fused


def _net_with_bn_stats():
    torch.manual_seed(0)
    net = _Net()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_fuse_pruned_convs_folds_bn_and_relu():
    net = _net_with_bn_stats()
    fused, counts = fuse_pruned_convs(net)
    assert counts == {"conv": 3, "bn": 2, "relu": 1, "pool": 0, "residual": 0, "skipped": 0, "why": ""}
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("PrunedConv2d") == 3 and "BatchNorm2d" not in kinds
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)
    assert isinstance(net.conv1, nn.Conv2d)  # the original is untouched


class _Relu6Net(nn.Module):
    """conv -> BN -> ReLU6 (module), a depthwise conv -> F.relu6, conv -> Hardtanh(0, 3) (fused, as a capped
    ReLU), conv -> Hardtanh(-1, 1) (not a ReLU: kept)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv3, self.act3 = nn.Conv2d(8, 8, 1), nn.Hardtanh(0.0, 3.0)
        self.conv4, self.act4 = nn.Conv2d(8, 4, 1), nn.Hardtanh(-1.0, 1.0)

    def forward(self, x):
        y = nn.functional.relu6(self.dw(self.act1(self.bn1(self.conv1(x)))))
        return self.act4(self.conv4(self.act3(self.conv3(y))))


def test_fuse_pruned_convs_fuses_relu6_and_zero_floored_hardtanh():
    torch.manual_seed(0)
    net = _Relu6Net().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        for c in (net.conv1, net.dw, net.conv3):
            c.weight.mul_(4)
    fused, counts = fuse_pruned_convs(net)
    assert counts == {"conv": 4, "bn": 1, "relu": 3, "pool": 0, "residual": 0, "skipped": 0, "why": ""}
    assert [fused.conv1.relu_max, fused.dw.relu_max, fused.conv3.relu_max] == [6.0, 6.0, 3.0]
    assert not fused.conv4.relu and isinstance(fused.act4, nn.Hardtanh)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)
        assert (net.act1(net.bn1(net.conv1(x))) == 6).any()  # the cap is reached, so the test can fail


class _Stem(nn.Module):
    """conv -> BN -> ReLU -> max pool (fusable), then conv -> max pool in ceil mode (not), then conv -> ReLU
    whose output feeds two pools (ReLU fused, neither pool)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2, ceil_mode=True)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.pool3 = nn.MaxPool2d(2)

    def forward(self, x):
        y = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        y = self.pool2(self.conv2(y))
        z = torch.relu(self.conv3(y))
        return self.pool3(z) + self.pool3(z * 2)


def test_fuse_pruned_convs_fuses_a_max_pool_after_bn_and_relu():
    torch.manual_seed(0)
    net = _Stem().eval()
    net.bn1.running_mean.uniform_(-0.5, 0.5)
    fused, counts = fuse_pruned_convs(net)
    assert counts == {"conv": 3, "bn": 1, "relu": 2, "pool": 1, "residual": 0, "skipped": 0, "why": ""}
    assert fused.conv1.max_pool == ((3, 3), (2, 2), (1, 1)) and fused.conv2.max_pool is None
    assert [type(m).__name__ for m in fused.modules()].count("MaxPool2d") == 2  # pool2 and pool3 stay
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 37, 41).contiguous(memory_format=fmt)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)


class _Blocks(nn.Module):
    """Skip connections: conv -> BN -> (+ x) -> ReLU (a ResNet block's end; fused), x + conv (MobileNetV2's,
    the residual first and no ReLU; fused), a conv whose output is added to a (C, 1, 1) tensor (a broadcast:
    not a skip connection), a conv added to itself (no other operand) and one added to a (1, C, H, W) table
    (the output's shape at batch 1 only: not fused)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.shift = nn.Parameter(torch.randn(8, 1, 1))
        self.conv4 = nn.Conv2d(8, 8, 1)
        self.conv5 = nn.Conv2d(8, 8, 1)
        self.table = nn.Parameter(torch.randn(1, 8, 9, 9))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)) + x)
        y = y + self.conv2(y)
        y = self.conv3(y) + self.shift
        z = self.conv4(y)
        return self.conv5(z + z) + self.table


def test_fuse_pruned_convs_fuses_skip_connections_given_an_example():
    torch.manual_seed(0)
    net = _Blocks().eval()
    net.bn1.running_mean.uniform_(-0.5, 0.5)
    for fmt, batch in ((torch.contiguous_format, 2), (torch.channels_last, 1)):
        x = torch.randn(batch, 8, 9, 9).contiguous(memory_format=fmt)
        fused, counts = fuse_pruned_convs(net, (x,))
        assert counts == {"conv": 5, "bn": 1, "relu": 1, "pool": 0, "residual": 2, "skipped": 0, "why": ""}
        called = [n.target for n in fused.graph.nodes if n.op == "call_module"]
        assert called == ["conv1", "conv2", "conv3", "conv4", "conv5"]
        adds = [n for n in fused.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
        assert len(adds) == 3  # the broadcast, the self-add and the table stay
        with torch.no_grad():
            torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)
        assert fused(x).is_contiguous(memory_format=fmt)
    # without an example the shapes are unknown: no add is fused
    assert fuse_pruned_convs(net)[1]["residual"] == 0
    # a training-mode BN is not folded, and the shape run leaves its flag and statistics as they were
    out, counts = fuse_pruned_convs(_Blocks().train(), (torch.randn(2, 8, 9, 9),))
    assert counts["bn"] == 0 and out.bn1.training and int(out.bn1.num_batches_tracked) == 0
    assert torch.equal(out.bn1.running_mean, torch.zeros(8))


def test_fold_bn_keeps_masks_and_outputs():
    net = _net_with_bn_stats()
    masked = sparsify(net, 0.6, pattern="unstructured")
    mask = get_mask(masked.conv1).clone()
    folded, n, why = fold_bn(masked)
    assert (n, why) == (2, "")
    assert "BatchNorm2d" not in [type(m).__name__ for m in folded.modules()]
    assert torch.equal(get_mask(folded.conv1), mask)  # still masked: zeros stay zeros
    assert torch.equal(folded.conv1.weight == 0, masked.conv1.weight == 0)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), masked(x), rtol=1e-4, atol=1e-5)
    assert isinstance(masked.bn1, nn.BatchNorm2d)  # the original is untouched
    plain = nn.Sequential(nn.Linear(4, 4))
    assert fold_bn(plain) == (plain, 0, "")  # nothing to fold: the model itself


class _Shared(nn.Module):
    """One conv called twice, its first output through a BN: folding would carry that BN into the other
    call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


def test_fold_bn_and_fuse_leave_a_shared_conv_alone():
    net = _Shared().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    folded, n, _ = fold_bn(net)
    fused, counts = fuse_pruned_convs(net)
    assert n == 0 and counts["bn"] == 0  # the conv becomes a PrunedConv2d at both calls, nothing folded
    assert counts["conv"] == 1  # one module, though called twice (the note counted it twice)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x))
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["csr", "bsr"])
def test_sparse_variants_fold_bn(method):
    net = _net_with_bn_stats()
    x = torch.randn(2, 3, 9, 9)
    b = Builder(net, (x,))
    mod, note = b.build(method, 0.5)
    kinds = [type(m).__name__ for m in mod.modules()]
    assert "BatchNorm2d" not in kinds and "SparseConv2d" in kinds
    assert "2 BN folded" in note
    if method == "csr":  # same zeros as the masked variant: the same function
        with torch.no_grad():
            torch.testing.assert_close(mod(x), b.masked(0.5)(x), rtol=1e-4, atol=1e-5)


class _PoolNet(nn.Module):
    """A stem (conv, BN, ReLU, max pool), a conv and a ceil-mode pool (which pyprune's kernel does not
    cover)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.ceil = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        return self.ceil(self.conv2(self.pool(self.bn(self.conv1(x)).relu())))


@pytest.mark.parametrize("method", ["csr", "bsr", "2:4"])
def test_sparse_variants_run_max_pools_on_pyprunes_kernel(method):
    net = _PoolNet().eval()
    x = torch.randn(2, 3, 13, 13)
    b = Builder(net, (x,))
    mod, note = b.build(method, 0.5)
    assert "1 max pool -> pyprune" in note
    assert type(mod.pool) is pyprune.nn.MaxPool2d and type(mod.ceil) is nn.MaxPool2d
    assert type(net.pool) is nn.MaxPool2d  # the model given is untouched
    if method == "csr":
        with torch.no_grad():
            torch.testing.assert_close(mod(x), b.masked(0.5)(x), rtol=1e-4, atol=1e-5)


class _PoolAfterAddNet(nn.Module):
    """A pool after a skip connection's add: no conv feeds it alone, so channel-pyprune cannot fuse it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.conv1(x).relu()
        return self.head(self.pool(self.conv2(y) + y))


@pytest.mark.parametrize("method", ["csr", "bsr"])
def test_sparse_variants_fuse_relus_and_skip_connections(method, monkeypatch):
    torch.manual_seed(0)
    net = _Blocks().eval()
    x = torch.randn(2, 8, 9, 9)
    mod, note = Builder(net, (x,), block=(4, 4)).build(method, 0.5)
    # conv1's BN folded, then + x and the ReLU; y + conv2(y) without one; the broadcast, self-add, table stay
    assert "1 ReLU fused, 2 residual add fused" in note
    assert mod.conv1.relu and not mod.conv2.relu and not mod.conv3.relu
    args = {n.target: n.args for n in mod.graph.nodes if n.op == "call_module"}
    assert [len(args[f"conv{i}"]) for i in range(1, 6)] == [2, 2, 1, 1, 1]
    adds = [n for n in mod.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3
    monkeypatch.setattr(variants, "fuse_sparse_epilogues", lambda m, example: (m, {"relu": 0, "residual": 0}))
    unfused, plain = Builder(net, (x,), block=(4, 4)).build(method, 0.5)
    assert "ReLU fused" not in plain and "residual" not in plain
    with torch.no_grad():
        torch.testing.assert_close(mod(x), unfused(x), rtol=1e-5, atol=1e-6)


class _CappedNet(nn.Module):
    """ReLU6 after a BN, F.relu6 and a Hardtanh floored at 0: capped ReLUs the sparse convs fuse; a Hardtanh
    from -1 they do not."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act1 = nn.ReLU6()
        self.conv2, self.conv3, self.conv4 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 8, 1)
        self.act3, self.act4 = nn.Hardtanh(0.0, 3.0), nn.Hardtanh(-1.0, 1.0)

    def forward(self, x):
        y = self.act1(self.bn(self.conv1(x)))
        y = nn.functional.relu6(self.conv2(y))
        return self.act4(self.conv4(self.act3(self.conv3(y))))


@pytest.mark.parametrize("method", ["csr", "bsr"])
def test_sparse_variants_fuse_relu6_and_zero_floored_hardtanh(method, monkeypatch):
    torch.manual_seed(0)
    net = _CappedNet().eval()
    with torch.no_grad():
        net.conv1.weight.mul_(4)
    x = 4 * torch.randn(2, 3, 9, 9)
    mod, note = Builder(net, (x,), block=(4, 4)).build(method, 0.5)
    assert "3 ReLU fused" in note
    assert [mod.conv1.relu_max, mod.conv2.relu_max, mod.conv3.relu_max] == [6.0, 6.0, 3.0]
    assert not mod.conv4.relu and isinstance(mod.act4, nn.Hardtanh)
    monkeypatch.setattr(variants, "fuse_sparse_epilogues", lambda m, example: (m, {"relu": 0, "residual": 0}))
    unfused, _ = Builder(net, (x,), block=(4, 4)).build(method, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), unfused(x), rtol=1e-5, atol=1e-6)
        assert (mod.conv1(x) == 6).any()  # the cap is reached, so the comparison can fail


def test_sparse_epilogues_fuse_in_a_model_without_bn_and_in_24(monkeypatch):
    # no BN: fold_bn hands back the model itself, which the fusion traces with pyprune's modules as leaves
    net = _PoolAfterAddNet().eval()
    x = torch.randn(2, 3, 12, 12)
    b = Builder(net, (x,))
    mod, note = b.build("csr", 0.5)
    assert "1 ReLU fused, 1 residual add fused" in note
    assert mod.conv1.relu and not mod.conv2.relu and type(net.conv1) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(mod(x), b.masked(0.5)(x), rtol=1e-4, atol=1e-5)
    # 2:4 fuses too (sparse24_conv2d's epilogue); its weights are the same built without the fusion
    blocks, x = _Blocks().eval(), torch.randn(2, 8, 9, 9)
    fused, note = Builder(blocks, (x,)).build("2:4", 0.5)
    assert "ReLU fused" in note and "residual add fused" in note
    monkeypatch.setattr(variants, "fuse_sparse_epilogues", lambda m, example: (m, {"relu": 0, "residual": 0}))
    plain, _ = Builder(blocks, (x,)).build("2:4", 0.5)
    assert not any(getattr(m, "relu", False) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-5)


def test_channel_pyprune_runs_unfused_max_pools_on_pyprunes_kernel():
    net = _PoolAfterAddNet().eval()
    x = torch.randn(2, 3, 12, 12)
    b = Builder(net, (x,))
    mod, note = b.build("channel-pyprune", 0.5)
    assert "1 max pool -> pyprune" in note
    assert type(mod.pool) is pyprune.nn.MaxPool2d
    channel, _ = b.build("channel", 0.5)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), channel(x), rtol=1e-4, atol=1e-5)


def test_builder_not_applicable_and_unknown():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    b = Builder(mlp, (torch.randn(2, 8),))
    with pytest.raises(NotApplicable, match="no Conv2d"):
        b.build("channel-pyprune", 0.5)
    with pytest.raises(NotApplicable, match="tiles by"):
        b.build("bsr", 0.5)  # 8x8 and 8x4 weights do not tile by 32x32
    with pytest.raises(ValueError, match="valid methods"):
        b.build("coo", 0.5)


def test_builder_shares_the_masked_model():
    mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 16)
    b = Builder(mlp, (x,))
    masked, _ = b.build("masked", 0.5)
    csr, note = b.build("csr", 0.5)
    ts, _ = b.build("torch.sparse", 0.5)
    assert "2 linear -> csr" in note
    with torch.no_grad():
        torch.testing.assert_close(csr(x), masked(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ts(x), masked(x), rtol=1e-5, atol=1e-5)
    assert pyprune.pruning.get_mask(masked[0]) is not None  # converting copies left the masks in place


class _Attn(nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_attention_flops_counted_on_both_sdpa_paths():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    expected = 2 * (2 * 2 * 16 * 16 * 8)  # q @ k^T and p @ v, per head
    assert measure_work(_Attn(), (q, k, v))["flops"] == expected
    # non-contiguous inputs take another kernel; the count must not change with the path
    qt, kt, vt = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
    assert measure_work(_Attn(), (qt, kt, vt))["flops"] == expected


def test_folded_and_fused_models_pickle():
    # the zoo's modules use `from __future__ import annotations`: fx kept the string annotations in the graph
    # code, and torch.save of fold_bn / fuse_pruned_convs' GraphModule failed ("'str' object has no attribute
    # '__name__'")
    import io

    from pyprune.models import resnet18

    net = resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    sparse = Builder(net, (x,)).build("csr", 0.5)[0]  # its convs with ReLUs and residuals fused
    for model in (fold_bn(net)[0], fuse_pruned_convs(net)[0], sparse):
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
