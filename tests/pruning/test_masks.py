"""Masks: exact densities, N:M patterns, blocks, global scope, fine-tuning, cubic schedule, convert."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyprune
from pyprune import models
from pyprune.pruning import CubicSchedule, get_mask, mask_density, remove_masks
from pyprune.pruning.masks import block_mask, block_scores, nm_mask, magnitude_mask


def test_magnitude_mask_hand_case():
    w = torch.tensor([[0.5, -3.0], [0.1, 2.0]])
    assert magnitude_mask(w, 0.5).tolist() == [[False, True], [False, True]]
    assert magnitude_mask(w, 0.0).all() and not magnitude_mask(w, 1.0).any()


@pytest.mark.parametrize("shape", [(7, 13), (97, 5), (16, 3, 3, 3)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_unstructured_density_is_exact(shape, sparsity):
    w = torch.randn(shape)
    m = magnitude_mask(w, sparsity)
    assert int((~m).sum()) == round(sparsity * w.numel())
    if 0 < sparsity < 1:
        assert w[m].abs().min() >= w[~m].abs().max()


def test_nm_mask_hand_case_and_any_n_m():
    w = torch.tensor([[1.0, -4.0, 2.0, 0.5, 0.0, 0.1, -0.2, 3.0]])
    assert nm_mask(w, 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]
    w = torch.randn(6, 24)
    for n, m in ((2, 4), (1, 4), (4, 8), (3, 6)):
        keep = nm_mask(w, n, m).reshape(6, -1, m)
        assert (keep.sum(-1) == n).all()


def test_block_mask_zeroes_lowest_norm_tiles_exactly():
    w = torch.ones(4, 4)
    w[:2, 2:] = 0.1  # the weakest 2x2 tile
    keep = block_mask(w, 0.25, (2, 2))
    assert block_scores(w, (2, 2)).shape == (2, 2)
    assert not keep[:2, 2:].any() and keep.sum() == 12
    ragged = block_mask(torch.randn(5, 4), 0.5, (2, 2))  # 3 x 2 tiles, the last row of tiles half outside
    assert ragged.shape == (5, 4)
    assert int(block_scores(torch.randn(5, 4), (2, 2)).numel()) == 6


def test_sparsify_layerwise_unstructured():
    model = models.lenet5()
    masked = pyprune.sparsify(model, sparsity=0.9)
    assert get_mask(model.fc1) is None  # original untouched
    for name, d in mask_density(masked).items():
        numel = masked.get_submodule(name).weight.numel()
        assert d == pytest.approx(1 - round(0.9 * numel) / numel), name
        assert int((masked.get_submodule(name).weight == 0).sum()) >= round(0.9 * numel)


def test_sparsify_global_is_exact_over_all_layers():
    model = models.lenet5()
    masked = pyprune.sparsify(model, sparsity=0.7, scope="global")
    masks = [get_mask(m) for m in masked.modules() if get_mask(m) is not None]
    total = sum(mk.numel() for mk in masks)
    assert sum(int((~mk).sum()) for mk in masks) == round(0.7 * total)
    assert len({round(float(mk.float().mean()), 3) for mk in masks}) > 1  # layers differ under one threshold


def test_sparsify_nm_pattern_on_linear_and_conv():
    model = models.bert("small", vocab_size=32)
    masked = pyprune.sparsify(model, pattern="2:4")
    for name, m in masked.named_modules():
        if isinstance(m, nn.Linear):
            assert (get_mask(m).reshape(m.out_features, -1, 4).sum(-1) == 2).all(), name
    conv = pyprune.sparsify(models.resnet18(), pattern="2:4", ignore=["conv1"])  # conv1: 3*7*7 = 147 inputs
    k = get_mask(conv.layer1[0].conv1).reshape(64, -1, 4)
    assert (k.sum(-1) == 2).all()
    with pytest.raises(ValueError, match=r"conv1 \(input dim 147 not a multiple of 4\).*ignore"):
        pyprune.sparsify(models.resnet18(), pattern="2:4")


def test_sparsify_block_pattern():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    masked = pyprune.sparsify(model, sparsity=0.5, pattern="block", block=(16, 16))
    for m in (masked[0], masked[2]):
        tiles = get_mask(m).reshape(m.out_features // 16, 16, m.in_features // 16, 16)
        per_tile = tiles.float().mean((1, 3))
        assert set(per_tile.unique().tolist()) == {0.0, 1.0} and per_tile.mean() == 0.5


def test_sparsify_block_accepts_an_int_for_square_tiles():
    model = nn.Sequential(nn.Linear(8, 8))
    square = get_mask(pyprune.sparsify(model, sparsity=0.5, pattern="block", block=4)[0])
    pair = get_mask(pyprune.sparsify(model, sparsity=0.5, pattern="block", block=(4, 4))[0])
    assert torch.equal(square, pair)
    assert set(square.reshape(2, 4, 2, 4).float().mean((1, 3)).unique().tolist()) == {0.0, 1.0}


def test_sparsify_ignore_accepts_one_name():
    model = nn.Sequential()
    model.add_module("dw", nn.Conv2d(8, 8, 3, groups=8))
    model.add_module("fc", nn.Conv2d(8, 16, 1))
    masked = pyprune.sparsify(model, sparsity=0.5, ignore="dw")
    assert get_mask(masked.dw) is None and get_mask(masked.fc) is not None


def test_masks_stay_fixed_through_fine_tuning():
    torch.manual_seed(0)
    masked = pyprune.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)), sparsity=0.75)
    zeros_before = [(m.weight == 0).clone() for m in (masked[0], masked[2])]
    opt = torch.optim.SGD(masked.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        masked(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
    for m, z in zip((masked[0], masked[2]), zeros_before):
        assert ((m.weight == 0) >= z).all()
    baked = remove_masks(masked)
    assert isinstance(baked[0].weight, nn.Parameter) and get_mask(baked[0]) is None
    assert int((baked[0].weight == 0).sum()) >= 48


def test_cubic_schedule_follows_zhu_gupta():
    sched = CubicSchedule(begin_step=0, end_step=10, frequency=2)
    masked = pyprune.sparsify(nn.Sequential(nn.Linear(20, 10)), sparsity=0.8, schedule=sched)
    assert mask_density(masked)["0"] == 1.0  # starts at the initial sparsity (0)
    seen = [sched.step() for _ in range(10)]
    assert seen[1] == pytest.approx(0.8 + (0 - 0.8) * (1 - 0.2) ** 3)
    assert mask_density(masked)["0"] == pytest.approx(0.2)
    assert seen[-1] == 0.8 and sched.step() == 0.8
    # monotone: every update zeroes at least what the previous one did
    sched2 = CubicSchedule(0, 6, 1)
    masked2 = pyprune.sparsify(nn.Sequential(nn.Linear(20, 10)), sparsity=0.9, schedule=sched2)
    prev = get_mask(masked2[0]).clone()
    for _ in range(6):
        sched2.step()
        cur = get_mask(masked2[0])
        assert (cur <= prev).all()
        prev = cur.clone()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(sparsity=1.5), ValueError, r"sparsity must be a number in \[0, 1\]"),
        (dict(pattern="3-4"), ValueError, r"pattern must be"),
        (dict(pattern="5:4"), ValueError, r"0 < N <= M"),
        (dict(scope="model"), ValueError, r"scope must be"),
        (dict(ignore=["fc9"]), ValueError, r"ignore: model has no layer named 'fc9'"),
        (dict(pattern="2:4", schedule=CubicSchedule()), ValueError, r"schedule= works with"),
        (dict(schedule="cubic"), TypeError, r"schedule must be"),
        (dict(pattern="block", block=(32, 32)), ValueError, r"not tiled by"),
        (dict(pattern="block", block=(4.0, 4.0)), TypeError, r"block must be an int or a \(bh, bw\) pair"),
        (dict(pattern="block", block=(2, 2, 2)), TypeError, r"block must be an int or a \(bh, bw\) pair"),
        (dict(pattern="block", block=0), ValueError, r"block must be \(bh, bw\) with positive sizes"),
    ],
)
def test_sparsify_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pyprune.sparsify(models.lenet5(), **kwargs)


def test_schedule_must_be_attached():
    with pytest.raises(RuntimeError, match="not attached"):
        CubicSchedule().step()
    with pytest.raises(ValueError, match="begin_step < end_step"):
        CubicSchedule(begin_step=5, end_step=5)


def _sparse_linear_available():
    return hasattr(pyprune.nn, "SparseLinear")


@pytest.mark.skipif(not _sparse_linear_available(), reason="pyprune.nn.SparseLinear not built yet")
@pytest.mark.parametrize("layout, pattern", [("csr", "unstructured"), ("bsr", "block"), ("2:4", "2:4")])
def test_convert_swaps_masked_linears_and_convs(layout, pattern):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    masked = pyprune.sparsify(model, sparsity=0.5, pattern=pattern, block=(4, 4), ignore=["0"])
    masked = pyprune.sparsify(masked, sparsity=0.5, ignore=["2", "4"], inplace=True)  # mask the conv too
    x = torch.randn(2, 3, 4, 4)
    fast, report = pyprune.convert(masked, layout=layout, block=(4, 4), return_report=True)
    assert report.converted == ["0", "2", "4"] and not report.left_dense
    assert isinstance(fast[2], pyprune.nn.SparseLinear) and isinstance(fast[0], pyprune.nn.SparseConv2d)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _sparse_linear_available(), reason="pyprune.nn.SparseLinear not built yet")
def test_convert_to_2_4_names_the_linear_whose_mask_is_not_2_4():
    # the error came from SparseLinear.from_dense, named its argument 'dense' and advised from_dense's arguments
    masked = pyprune.sparsify(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), sparsity=0.5)
    with pytest.raises(ValueError) as exc:
        pyprune.convert(masked, layout="2:4")
    assert "convert(layout='2:4'): masked Linear '0' cannot be stored" in str(exc.value)
    assert "sparsify(pattern='2:4')" in str(exc.value)
    with pytest.raises(ValueError) as exc:  # a bad block is an argument error, not a mask the layout cannot hold
        pyprune.convert(masked, layout="bsr", block=(0, 32))
    assert "block" in str(exc.value) and "cannot be stored" not in str(exc.value)


def test_convert_rejects_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        pyprune.convert(models.lenet5(), layout="coo")


class _Block(nn.Module):
    """conv -> BN -> ReLU -> max pool, then conv -> BN, the skip connection's add and a ReLU: what
    convert(fuse=True) folds and fuses."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn1(self.conv1(x))))
        return torch.relu(self.bn2(self.conv2(y)) + y)


def _masked_block():
    torch.manual_seed(0)
    net = _Block()
    for bn in (net.bn1, net.bn2):  # statistics away from (0, 1), so that an unfolded or misfolded BN shows
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
    return pyprune.sparsify(net.eval(), sparsity=0.5, pattern="unstructured")


@pytest.mark.skipif(not _sparse_linear_available(), reason="pyprune.nn.SparseLinear not built yet")
@pytest.mark.parametrize("layout", ["csr", "bsr", "auto"])
def test_convert_fuse_folds_bn_and_fuses_epilogues(layout):
    masked = _masked_block()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = masked(x)
    out, rep = pyprune.convert(masked, layout, block=(8, 8), fuse=True, example_inputs=x, return_report=True)
    assert rep.fused["bn"] == 2 and rep.fused["max_pool"] == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    assert any(isinstance(m, pyprune.nn.MaxPool2d) for m in out.modules())
    convs = [m for m in out.modules() if isinstance(m, pyprune.nn.SparseConv2d)]
    if layout != "auto":  # (auto may keep a layer dense: then nothing is fused into it)
        assert rep.fused["relu"] == 2 and rep.fused["residual"] == 1
        assert len(convs) == 2 and all(m.relu for m in convs)
    assert not out.training
    with torch.no_grad():
        torch.testing.assert_close(out(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(masked(x), want)  # the model given is not changed
    assert isinstance(masked.bn1, nn.BatchNorm2d)


class _PointwiseBlock(nn.Module):
    """1x1 conv -> BN -> ReLU, 1x1 conv -> BN, the skip connection's add and a ReLU6: 2:4 masks from sparsify
    (groups of 4 input channels) are 2:4 in SparseConv2d's tap-major order on 1x1 convs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24)
        self.conv2, self.bn2 = nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16)

    def forward(self, x):
        return F.relu6(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


@pytest.mark.skipif(not _sparse_linear_available(), reason="pyprune.nn.SparseLinear not built yet")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_convert_fuse_2to4_fuses_epilogues_into_sparse24_conv2d(channels_last):
    torch.manual_seed(0)
    net = _PointwiseBlock().eval()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    masked = pyprune.sparsify(net, sparsity=0.5, pattern="2:4")
    x = 3 * torch.randn(2, 16, 9, 9)  # outputs past ReLU6's cap too
    if channels_last:
        masked = masked.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = masked(x)
    out, rep = pyprune.convert(masked, "2:4", fuse=True, example_inputs=x, return_report=True)
    assert rep.fused["bn"] == 2 and rep.fused["relu"] == 2 and rep.fused["residual"] == 1
    convs = [m for m in out.modules() if isinstance(m, pyprune.nn.SparseConv2d)]
    assert len(convs) == 2 and all(m.layout == "2:4" and m.kernel_op(x) == "sparse24_conv2d" for m in convs)
    assert [m.relu_max for m in convs] == [None, 6.0]
    with torch.no_grad(), torch.profiler.profile() as prof:
        y = out(x)
    names = [e.name for e in prof.events()]
    assert names.count("pyprune::sparse24_conv2d") == 2
    assert not any(n in names for n in ("aten::relu", "aten::add", "aten::hardtanh", "aten::clamp"))
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    assert (want == 6).any()


def test_to_pruned_convs_runs_a_channel_pruned_model_on_pruned_conv2d():
    torch.manual_seed(0)
    net = _masked_block()
    pyprune.pruning.remove_masks(net)
    x = torch.randn(2, 3, 12, 12)
    small = pyprune.prune_channels(net, x, ratio=0.5, importance="l1")
    with torch.no_grad():
        want = small(x)
    out, counts = pyprune.to_pruned_convs(small, x, return_report=True)
    assert {k: counts[k] for k in ("conv", "bn", "relu", "pool", "residual", "skipped")} == {
        "conv": 2, "bn": 2, "relu": 2, "pool": 1, "residual": 1, "skipped": 0
    }  # fmt: skip
    assert sum(isinstance(m, pyprune.nn.PrunedConv2d) for m in out.modules()) == 2
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)) for m in out.modules())
    with torch.no_grad():
        torch.testing.assert_close(out(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(small(x), want)  # the model given is not changed
    without = pyprune.to_pruned_convs(small, return_report=True)[1]  # no example: no shapes, no skip add
    assert without["residual"] == 0 and without["conv"] == 2
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pyprune.to_pruned_convs("resnet50")


def test_convert_fuse_rejects_what_it_cannot_do():
    masked = _masked_block()
    x = torch.randn(1, 3, 12, 12)
    with pytest.raises(TypeError, match="fuse must be a bool"):
        pyprune.convert(masked, fuse=1, example_inputs=x)
    with pytest.raises(ValueError, match="fuse=True needs example_inputs"):
        pyprune.convert(masked, fuse=True)
    with pytest.raises(ValueError, match="inplace"):
        pyprune.convert(masked, fuse=True, example_inputs=x, inplace=True)
    with pytest.raises(ValueError, match="train=True"):
        pyprune.convert(masked, "auto", fuse=True, example_inputs=x, train=True)
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        pyprune.convert(masked.train(), fuse=True, example_inputs=x)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 5)]),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_mask_properties(rows, groups, nm, sparsity, seed):
    n, m = nm
    w = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(w, n, m)
    assert (keep.reshape(rows, groups, m).sum(-1) == n).all()
    # every kept weight is at least as large as every pruned weight of its own group of m
    g = w.abs().reshape(rows, groups, m)
    k = keep.reshape(rows, groups, m)
    kept_min = torch.where(k, g, torch.inf).amin(-1)
    pruned_max = torch.where(~k, g, -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()
    u = magnitude_mask(w, sparsity)
    assert int((~u).sum()) == round(sparsity * w.numel())


def test_sparsify_again_only_prunes_further():
    # scoring the masked weight tied every pruned weight at 0: a second call at a lower sparsity revived the
    # smallest ones by index, with their stale values
    lin = nn.Linear(100, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(100, 0, -1, dtype=torch.float32))  # magnitudes fall with the index
    twice = pyprune.sparsify(pyprune.sparsify(lin, 0.9), 0.5)
    assert get_mask(twice).nonzero()[:, 1].tolist() == list(range(10))
    more = pyprune.sparsify(pyprune.sparsify(lin, 0.5), 0.9)
    assert get_mask(more).nonzero()[:, 1].tolist() == list(range(10))


def test_schedule_serves_one_model_and_only_grows():
    # a second sparsify took the schedule over and left the first model dense; a falling schedule revived weights
    sched = CubicSchedule(0, 10, 1)
    pyprune.sparsify(nn.Linear(8, 8), 0.5, schedule=sched)
    with pytest.raises(ValueError, match="already drives another sparsify call"):
        pyprune.sparsify(nn.Linear(8, 8), 0.5, schedule=sched)
    with pytest.raises(ValueError, match="initial_sparsity \\(0.9\\) must not exceed the final sparsity"):
        pyprune.sparsify(nn.Linear(8, 8), 0.1, schedule=CubicSchedule(0, 10, 1, initial_sparsity=0.9))
    with pytest.raises(ValueError, match="initial_sparsity must be a number"):
        CubicSchedule(initial_sparsity=1.5)


def test_tied_weights_get_one_mask_in_global_scope():
    # the shared tensor was ranked twice; the cut fell between its copies and remove_masks changed the output
    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    masked = pyprune.sparsify(model, 0.4, scope="global")
    assert torch.equal(get_mask(masked[0]), get_mask(masked[2]))
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = masked(x)
        torch.testing.assert_close(remove_masks(masked)(x), y)


def test_sparsify_odd_layers_and_types():
    # a layer without outputs failed in a reshape; one class for types= crashed the "none found" message; a
    # weightless module of types= raised a raw AttributeError
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 4), nn.Linear(4, 4))
    assert get_mask(pyprune.sparsify(model, 0.5)[2]) is not None
    assert get_mask(pyprune.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, types=nn.Linear)[0]) is not None
    with pytest.raises(ValueError, match="found no \\['Conv2d'\\] layers"):
        pyprune.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, types=nn.Conv2d)
    with pytest.raises(ValueError, match="types: layer '0' \\(LayerNorm\\) has no weight tensor"):
        pyprune.sparsify(nn.Sequential(nn.LayerNorm(4, elementwise_affine=False)), 0.5, types=nn.LayerNorm)
