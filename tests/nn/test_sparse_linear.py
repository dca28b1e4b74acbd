import io

import pytest
import torch
import torch.nn.functional as F

from pyprune.nn import SparseLinear

LAYOUTS = [("csr", 0.9), ("bsr", 0.75), ("2:4", 0.5)]


@pytest.mark.parametrize("layout,sparsity", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_matches_linear_with_pruned_weight(layout, sparsity, bias):
    lin = torch.nn.Linear(96, 40, bias=bias)
    sp = SparseLinear.from_dense(lin, sparsity=sparsity, layout=layout, block=(8, 16))
    dense = sp.to_dense()
    assert isinstance(dense, torch.nn.Linear)
    assert abs(float((dense.weight == 0).float().mean()) - sparsity) < 0.02
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(sp(x), dense(x), atol=1e-5, rtol=1e-5)
    # the kept weights are the largest: every pruned |w| <= every kept |w| (elementwise layouts)
    if layout == "csr":
        kept = dense.weight != 0
        assert lin.weight.abs()[~kept].max() <= lin.weight.abs()[kept].min()


def test_sparsity_none_keeps_existing_zeros_exactly():
    lin = torch.nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0
    for layout in ("csr", "bsr"):
        sp = SparseLinear.from_dense(lin, layout=layout, block=(4, 4))
        assert torch.equal(sp.to_dense().weight, lin.weight)


def test_extra_repr_shows_layout_and_density():
    sp = SparseLinear.from_dense(torch.nn.Linear(64, 32), sparsity=0.75, layout="bsr", block=(16, 16))
    r = repr(sp)
    assert "layout=bsr" in r and "block=(16, 16)" in r and "density=0.250" in r


@pytest.mark.parametrize("layout,sparsity", LAYOUTS)
def test_state_dict_round_trip_into_fresh_module(layout, sparsity):
    sp = SparseLinear.from_dense(torch.nn.Linear(48, 24), sparsity=sparsity, layout=layout, block=(8, 8))
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    buf.seek(0)
    fresh = SparseLinear(48, 24, layout=layout, block=(8, 8))
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(3, 48)
    assert torch.equal(fresh(x), sp(x))


def test_state_dict_layout_mismatch_is_refused():
    sp = SparseLinear.from_dense(torch.nn.Linear(16, 8), sparsity=0.5, layout="csr")
    with pytest.raises(ValueError, match="layout"):
        SparseLinear(16, 8, layout="bsr", block=(4, 4)).load_state_dict(sp.state_dict())


@pytest.mark.parametrize("layout", ["csr", "bsr", "2:4"])
def test_state_dict_of_another_shape_is_refused_and_changes_nothing(layout):
    # nn.Linear refuses a weight of another size; the weight adopted the stored sizes, in_features stayed 12,
    # and the forward silently used 10 of the 12 inputs
    source = SparseLinear.from_dense(torch.nn.Linear(16, 20), sparsity=0.5, layout=layout, block=(4, 4))
    sd = source.state_dict()
    target = SparseLinear.from_dense(torch.nn.Linear(24, 20), sparsity=0.5, layout=layout, block=(4, 4))
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match=r"holds a \(20, 16\) weight, this module needs \(20, 24\)"):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("layout", ["csr", "bsr", "2:4"])
def test_optimizer_built_before_a_load_trains_the_loaded_values(layout):
    # the load put a new Parameter in place of values: opt.step() then left the weight alone
    sp = SparseLinear.from_dense(torch.nn.Linear(16, 8), sparsity=0.5, layout=layout, block=(4, 4))
    opt = torch.optim.SGD(sp.parameters(), lr=0.1)
    values = sp.weight.values
    sp.load_state_dict(SparseLinear.from_dense(torch.nn.Linear(16, 8), 0.5, layout, (4, 4)).state_dict())
    assert sp.weight.values is values
    before = values.detach().clone()
    sp(torch.randn(3, 16)).square().sum().backward()
    opt.step()
    assert not torch.equal(sp.weight.values.detach(), before)


def test_refused_load_leaves_the_weight_as_it_was():
    # the load swapped in the incoming sizes first: a checkpoint missing col_indices (another nnz) left new
    # values next to the old indices, and a corrupt one kept its out-of-range columns
    sp = SparseLinear.from_dense(torch.nn.Linear(40, 24), sparsity=0.7)
    w = sp.weight.to_dense().clone()
    sd = SparseLinear.from_dense(torch.nn.Linear(40, 24), sparsity=0.5).state_dict()
    del sd["weight.col_indices"]
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "weight.col_indices"'):
        sp.load_state_dict(sd)
    assert torch.equal(sp.weight.to_dense(), w)
    sd = SparseLinear.from_dense(torch.nn.Linear(40, 24), sparsity=0.5).state_dict()
    sd["weight.col_indices"][0] = 1000
    with pytest.raises(ValueError, match="col_indices must lie in"):
        sp.load_state_dict(sd)
    assert torch.equal(sp.weight.to_dense(), w)
    x = torch.randn(2, 40)
    torch.testing.assert_close(sp(x), F.linear(x, w, sp.bias))


@pytest.mark.parametrize("layout", ["csr", "bsr", "2:4"])
def test_state_dict_in_another_dtype_loads_in_the_modules_dtype(layout):
    # as nn.Linear's load casts: the values came in float16 next to a float32 bias, and no input dtype worked
    half = SparseLinear.from_dense(torch.nn.Linear(16, 8), sparsity=0.5, layout=layout, block=(4, 4)).half()
    fresh = SparseLinear(16, 8, layout=layout, block=(4, 4))
    fresh.load_state_dict(half.state_dict())
    assert fresh.weight.values.dtype == torch.float32 and fresh.bias.dtype == torch.float32
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), half.float()(x))


def test_to_dtype_and_device_moves_everything():
    sp = SparseLinear.from_dense(torch.nn.Linear(16, 8), sparsity=0.5, layout="csr").to(torch.float64)
    assert sp.weight.values.dtype == torch.float64 and sp.bias.dtype == torch.float64
    assert sp.weight.col_indices.dtype == torch.int32  # indices keep their dtype
    x = torch.randn(2, 16, dtype=torch.float64)
    torch.testing.assert_close(sp(x), sp.to_dense()(x))


@pytest.mark.parametrize("layout,sparsity", LAYOUTS)
def test_fine_tune_updates_only_stored_values(layout, sparsity):
    lin = torch.nn.Linear(32, 8)
    sp = SparseLinear.from_dense(lin, sparsity=sparsity, layout=layout, block=(4, 8))
    pattern = sp.to_dense().weight != 0
    opt = torch.optim.SGD(sp.parameters(), lr=0.1)
    x, target = torch.randn(64, 32), torch.randn(64, 8)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(sp(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not bool((sp.to_dense().weight != 0)[~pattern].any())


@pytest.mark.parametrize("layout,sparsity", LAYOUTS)
def test_torch_compile_fullgraph_matches_eager(layout, sparsity):
    model = torch.nn.Sequential(
        SparseLinear.from_dense(torch.nn.Linear(32, 64), sparsity=sparsity, layout=layout, block=(8, 8)),
        torch.nn.ReLU(),
        SparseLinear.from_dense(torch.nn.Linear(64, 16), sparsity=sparsity, layout=layout, block=(8, 8)),
    )
    x = torch.randn(4, 7, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("layout,sparsity", [("csr", 0.9), ("2:4", 0.5)])
def test_inductor_training_with_the_readme_workaround_matches_eager(layout, sparsity):
    # torch 2.13's inductor reorders a max pool's backward scatter after the conv gradient that reads it
    # (zero conv gradients, with or without a sparse layer); the README's workaround turns that pass off
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(128, 32), torch.nn.ReLU(),
        SparseLinear.from_dense(torch.nn.Linear(32, 16), sparsity=sparsity, layout=layout),
    )  # fmt: skip
    x = torch.randn(4, 3, 8, 8)
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    assert want[0].norm() > 0
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(reorder_for_peak_memory=False):
            compiled = torch.compile(model)
            model.zero_grad()
            compiled(x).square().sum().backward()
    finally:
        torch._dynamo.reset()
    for (name, p), g in zip(model.named_parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_input_raises_clearly():
    sp = SparseLinear.from_dense(torch.nn.Linear(16, 8), sparsity=0.5)
    with pytest.raises(ValueError, match="in_features=16"):
        sp(torch.randn(2, 15))
    with pytest.raises(TypeError, match="dtype"):
        sp(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="Linear"):
        SparseLinear.from_dense(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="layout"):
        SparseLinear.from_dense(torch.nn.Linear(4, 4), layout="coo")
    with pytest.raises(ValueError, match="sparsity"):
        SparseLinear.from_dense(torch.nn.Linear(4, 4), sparsity=1.5)
    with pytest.raises(ValueError, match="2:4"):
        SparseLinear.from_dense(torch.nn.Linear(8, 4), sparsity=0.9, layout="2:4")
    with pytest.raises(ValueError, match="NaN"):
        lin = torch.nn.Linear(4, 4)
        with torch.no_grad():
            lin.weight[0, 0] = float("nan")
        SparseLinear.from_dense(lin)


@pytest.mark.parametrize("layout", ["csr", "bsr", "2:4"])
def test_deferred_init_on_meta_then_load(layout):
    # built on the meta device (the deferred-init pattern), then materialised and loaded; construction read
    # index values (.item() on meta) and failed, as did repr of a module moved to meta
    source = SparseLinear.from_dense(torch.nn.Linear(40, 24), sparsity=0.5, layout=layout, block=(8, 8))
    with torch.device("meta"):
        m = SparseLinear(40, 24, layout=layout, block=(8, 8))
    assert m.weight.values.is_meta and "density=nan" in repr(m)
    assert SparseLinear(40, 24, layout=layout, block=(8, 8), device="meta").weight.values.is_meta
    m = m.to_empty(device="cpu")
    m.load_state_dict(source.state_dict())
    x = torch.randn(3, 40)
    torch.testing.assert_close(m(x), source(x))
    assert "density=nan" in repr(source.to("meta"))  # moved there: nothing to count, and no crash


@pytest.mark.parametrize("tokens", [4, 64])
def test_gradient_penalty_double_backward_bsr(tokens):
    # few tokens take the values' gradient through a bmm into one output (out=), which autograd cannot
    # differentiate: create_graph=True failed with "bmm(): functions with out=... arguments"
    torch.manual_seed(0)
    sp = SparseLinear.from_dense(torch.nn.Linear(64, 48), sparsity=0.5, layout="bsr", block=(16, 16))
    dense = sp.to_dense()
    grads = []
    for m in (sp, dense):
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        grads.append((x.grad, m.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_autocast_activations_are_computed_in_the_weights_dtype():
    # a bf16 activation from an autocast layer before was refused ("input has dtype torch.bfloat16 but the
    # weight is torch.float32"); under autocast the modules now compute in their own dtype, as autocast's
    # fp32-list ops do
    from pyprune.nn import PrunedConv2d, SparseConv2d

    conv = torch.nn.Conv2d(16, 8, 3, padding=1)
    cases = [
        (SparseLinear.from_dense(torch.nn.Linear(64, 32), sparsity=0.5), torch.randn(4, 64)),
        (SparseConv2d.from_dense(conv, sparsity=0.5), torch.randn(2, 16, 6, 6)),
        (PrunedConv2d.from_dense(conv, keep_in=[0, 2, 4]), torch.randn(2, 16, 6, 6)),
    ]
    for m, x in cases:
        xb = x.bfloat16().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xb)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, m(xb.detach().float()))
        y.sum().backward()
        assert xb.grad is not None and xb.grad.dtype == torch.bfloat16
        with pytest.raises(TypeError, match="input has dtype torch.bfloat16 but the weight is torch.float32"):
            m(xb.detach())  # outside autocast a mismatch is still an error
