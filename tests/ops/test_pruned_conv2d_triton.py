"""Triton pruned_conv2d (kernels/pruned_conv2d.py), its CUDA router entries, and the CUDA kernel on a GPU.

CPU (CI): the kernels run under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes (the interpreter gets bf16 wrong),
loaded under a private name with TRITON_INTERPRET=1 set only while their @triton.jit decorators run (as in
test_bsr_linear_triton.py), so the GPU tests of the same process still compile for the device.
GPU (`-m gpu`): the routed op on CUDA through every available backend (triton, cuda) and dtype, against float64;
opcheck, torch.compile, gradients through PrunedConv2d.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyprune.nn import PrunedConv2d
from pyprune.ops import _router, pruned_conv2d
from pyprune.reference import pruned_conv2d_ref

from .triton_interp import case, check_layout, interp_fixture, to_double

HAS_CUDA = torch.cuda.is_available()


interp = interp_fixture("pruned_conv2d")


def make_case(
    n, c, hw, c_out, k, keep_in=None, keep_out=None, out_channels=None, stride=1, padding=0, dilation=1,
    groups=1, relu=False, bias=True, channels_last=False, dtype=torch.float32, device="cpu", seed=0,
):  # fmt: skip
    """The op's positional arguments: x (N, c, hw, hw) full-width, weight over the kept channels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=gen)
    c_in = c if keep_in is None else len(keep_in)
    w = torch.randn(c_out, c_in // groups, k, k, generator=gen) / (c_in // groups * k * k) ** 0.5
    b = torch.randn(c_out, generator=gen) if bias else None
    x, w = x.to(device, dtype), w.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    b = b.to(device, dtype) if b is not None else None
    ii = torch.tensor(keep_in, device=device) if keep_in is not None else None
    oi = torch.tensor(keep_out, device=device) if keep_out is not None else None
    oc = out_channels if out_channels is not None else c_out
    return [x, w, b, ii, oi, oc, [stride] * 2, [padding] * 2, [dilation] * 2, groups, relu]


def ref64(args):
    return pruned_conv2d_ref(*to_double(args))


def naive(args):
    """The same conv in the inputs' dtype by PyTorch (cuDNN on CUDA, compacted input)."""
    return pruned_conv2d_ref(*args)


def fp32_tol(args):
    k = args[1].shape[1] * args[1].shape[2] * args[1].shape[3]
    return 1e-5 * max(1, k) ** 0.5 * 4


ODD7 = [0, 2, 3, 5, 6, 7, 8]  # 7 of 9 input channels
# (id, make_case kwargs): hand-picked, every kernel path and edge at least once, each small enough to interpret
CPU_CASES = [
    case("1x1", n=2, c=9, hw=5, c_out=20, k=1, keep_in=ODD7),
    case("3x3_pad", n=2, c=9, hw=5, c_out=20, k=3, keep_in=ODD7, padding=1),
    case("3x3_stride2_cl", n=2, c=9, hw=7, c_out=17, k=3, keep_in=ODD7, padding=1, stride=2, channels_last=True),
    case("dilation2", n=1, c=8, hw=7, c_out=6, k=3, padding=2, dilation=2, relu=True),
    case("3x3_two_cblocks", n=1, c=40, hw=4, c_out=18, k=3, keep_in=list(range(1, 40, 2)), padding=1),
    case("groups2_cl", n=1, c=8, hw=6, c_out=6, k=3, keep_in=[0, 1, 3, 4, 5, 7], padding=1, groups=2,
         channels_last=True),
    case("depthwise_scatter", n=2, c=8, hw=6, c_out=6, k=3, keep_in=[0, 1, 3, 4, 5, 7],
         keep_out=[0, 1, 2, 5, 8, 9], out_channels=10, padding=1, groups=6, relu=True),
    case("cin1_cout1", n=2, c=1, hw=6, c_out=1, k=3, padding=1),
    case("97ch_1x1_cl_nobias", n=1, c=100, hw=4, c_out=33, k=1, keep_in=list(range(3, 100)), bias=False,
         channels_last=True),
    case("scatter_relu_cl", n=2, c=9, hw=5, c_out=20, k=3, keep_in=ODD7, keep_out=list(range(1, 41, 2)),
         out_channels=43, padding=1, relu=True, channels_last=True),
]  # fmt: skip


# ---- CPU: the kernels under the Triton interpreter -------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("kw", [c[1] for c in CPU_CASES], ids=[c[0] for c in CPU_CASES])
def test_interpreted_fp32_matches_float64(interp, kw):
    args = make_case(**kw)
    y = interp.pruned_conv2d_triton(*args, allow_tf32=False)
    want = ref64(args)
    assert y.shape == want.shape and y.dtype == torch.float32
    check_layout(y, args)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=fp32_tol(args))
    if kw.get("keep_out") is not None:  # channels outside out_index are exactly zero
        outside = torch.ones(kw["out_channels"], dtype=torch.bool)
        outside[kw["keep_out"]] = False
        assert torch.count_nonzero(y[:, outside]) == 0


@pytest.mark.triton
@pytest.mark.parametrize("name", ["3x3_pad", "3x3_stride2_cl", "depthwise_scatter"])
def test_interpreted_fp16_at_most_twice_naive_error(interp, name):
    args = make_case(**dict(CPU_CASES)[name], dtype=torch.float16)
    y = interp.pruned_conv2d_triton(*args)
    assert y.dtype == torch.float16
    want = ref64(args)
    err = (y.double() - want).abs().max().item()
    nerr = (naive(args).double() - want).abs().max().item()
    assert err <= 2 * nerr + 1e-6, (err, nerr)


@pytest.mark.triton
def test_interpreted_non_contiguous_x_and_empty_batch(interp):
    args = make_case(n=2, c=12, hw=6, c_out=5, k=3, keep_in=[1, 4, 6, 11], padding=1)
    args[0] = torch.randn(2, 6, 6, 24)[..., ::2].permute(0, 3, 1, 2)  # (2, 12, 6, 6), no dense layout
    assert not args[0].is_contiguous() and not args[0].is_contiguous(memory_format=torch.channels_last)
    y = interp.pruned_conv2d_triton(*args, allow_tf32=False)
    torch.testing.assert_close(y.double(), ref64(args), rtol=0, atol=fp32_tol(args))
    args[0] = torch.randn(0, 12, 6, 6)
    assert interp.pruned_conv2d_triton(*args).shape == (0, 5, 6, 6)


@pytest.mark.triton
def test_interpreted_launcher_rejects_bad_dtype(interp):
    args = make_case(n=1, c=4, hw=4, c_out=4, k=1)
    args[1] = args[1].double()
    with pytest.raises(TypeError, match="dtype"):
        interp.pruned_conv2d_triton(*args)
    args[0], args[2] = args[0].double(), args[2].double()
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        interp.pruned_conv2d_triton(*args)


# ---- CPU: the router's pruned_conv2d entries --------------------------------------------------------------


def test_router_lists_triton_cuda_reference_and_explains_cuda():
    assert [b.name for b in _router.PRUNED_CONV2D_BACKENDS] == ["triton", "cuda", "reference"]
    args = make_case(n=1, c=4, hw=4, c_out=4, k=1)
    cuda = _router.PRUNED_CONV2D_BACKENDS[1]
    from pyprune import _extension

    reason = cuda.unavailable(*args)
    if not _extension.HAS_CUDA:
        assert reason and _extension.CUDA_REASON in reason
    triton_be = _router.PRUNED_CONV2D_BACKENDS[0]
    assert "float64" in triton_be.unavailable(*make_case(n=1, c=4, hw=4, c_out=4, k=1, dtype=torch.float64))


@pytest.mark.triton
def test_routed_triton_backend_runs_the_interpreted_kernel(interp, monkeypatch):
    # the CUDA router's impl, called with CPU tensors, its Triton backend pointed at the interpreted module
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (interp, None))
    impl = _router.route("pruned_conv2d", _router.PRUNED_CONV2D_BACKENDS)
    args = make_case(**dict(CPU_CASES)["scatter_relu_cl"])
    with _router.use_backend("triton"), torch.backends.cudnn.flags(allow_tf32=False):
        y = impl(*args)
    torch.testing.assert_close(y.double(), ref64(args), rtol=0, atol=fp32_tol(args))


@pytest.mark.triton
@pytest.mark.parametrize("name", ["3x3_pad", "depthwise_scatter"])
def test_routed_triton_backend_fuses_relu_max(interp, monkeypatch, name):
    # relu_max (ReLU6) in the Triton kernels' epilogue (implicit GEMM and depthwise), through the router; the
    # CUDA backend gets a clamp after its kernel instead (exercised here through a stand-in kernel)
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (interp, None))
    impl = _router.route("pruned_conv2d", _router.PRUNED_CONV2D_BACKENDS)
    args = make_case(**{**dict(CPU_CASES)[name], "relu": True})
    args[0] = args[0] * 4  # outputs past the cap
    want = pruned_conv2d_ref(*to_double(args), [], 0.5)
    assert (want == 0.5).any() and (want == 0).any()
    with _router.use_backend("triton"), torch.backends.cudnn.flags(allow_tf32=False):
        y = impl(*args, [], 0.5)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=fp32_tol(args))
    unfused = _router._pruned_conv2d_checked(lambda *a: pruned_conv2d_ref(*a))  # ReLU only, as CUDA's
    torch.testing.assert_close(unfused(*args, [], 0.5).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("name", ["3x3_pad", "depthwise_scatter"])
def test_routed_residual_in_the_triton_epilogue(interp, monkeypatch, name):
    # the Triton kernels (implicit GEMM and depthwise, interpreted) add the residual before the ReLU in their
    # epilogue, in any memory format, and a scattered output's other channels get the residual through the
    # ReLU; the CUDA backend's kernel runs without the ReLU and the router adds the residual after it (a
    # stand-in kernel here)
    monkeypatch.setattr(_router, "load_triton_kernels", lambda: (interp, None))
    impl = _router.route("pruned_conv2d", _router.PRUNED_CONV2D_BACKENDS)
    args = make_case(**{**dict(CPU_CASES)[name], "relu": True})
    y0 = pruned_conv2d_ref(*args)
    res = torch.randn(y0.shape) * 2
    if not args[0].is_contiguous(memory_format=torch.channels_last):
        res = res.contiguous(memory_format=torch.channels_last)  # the other format than x's
    want = pruned_conv2d_ref(*to_double(args), [], 0.5, res.double())
    if args[4] is not None:
        assert args[4].numel() < args[5]  # (a scattered output with channels outside out_index)
    assert (want == 0.5).any() and (want == 0).any() and ((want > 0) & (want < 0.5)).any()
    with _router.use_backend("triton"), torch.backends.cudnn.flags(allow_tf32=False):
        y = impl(*args, [], 0.5, res)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=fp32_tol(args))
    unfused = _router._pruned_conv2d_checked(lambda *a: pruned_conv2d_ref(*a))
    plain = torch.relu(pruned_conv2d_ref(*to_double(args[:-1]), False) + res.double())  # uncapped
    torch.testing.assert_close(unfused(*args, [], None, res).double(), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda a: a.__setitem__(3, torch.tensor([0, 2, 3, 5, 6, 7, 9])), "in_index"),  # channel 9 of 9
        (lambda a: a.__setitem__(3, torch.tensor([0, 2, 2, 5, 6, 7, 8])), "sorted"),
        (lambda a: a.__setitem__(4, torch.tensor([-1] + list(range(1, 20)))), "out_index"),
        (lambda a: a.__setitem__(1, a[1][:, :3]), "weight"),
    ],
    ids=["in_range", "in_dup", "out_negative", "weight_shape"],
)
def test_router_checks_run_before_any_kernel(bad, match):
    launched = []
    checked = _router._pruned_conv2d_checked(lambda *a: launched.append(a))
    args = make_case(n=1, c=9, hw=5, c_out=20, k=3, keep_in=ODD7, keep_out=list(range(20)), out_channels=21)
    checked(*args)
    assert len(launched) == 1  # the good call reaches the kernel
    bad(args)
    with pytest.raises(ValueError, match=match):
        checked(*args)
    assert len(launched) == 1


# ---- GPU -------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HALF = list(range(0, 64, 2))  # keep 0.5 of 64, every other channel
GPU_CASES = [
    case("1x1", n=2, c=64, hw=14, c_out=48, k=1, keep_in=HALF),
    case("3x3", n=2, c=64, hw=14, c_out=48, k=3, keep_in=HALF, padding=1, relu=True),
    case("3x3_stride2_cl", n=2, c=64, hw=15, c_out=40, k=3, keep_in=HALF, padding=1, stride=2, channels_last=True),
    case("dilation2_cl", n=1, c=64, hw=13, c_out=32, k=3, keep_in=HALF, padding=2, dilation=2, channels_last=True),
    case("groups4", n=2, c=64, hw=9, c_out=32, k=3, keep_in=HALF, padding=1, groups=4),
    case("depthwise_cl", n=2, c=64, hw=14, c_out=32, k=3, keep_in=HALF, keep_out=HALF, out_channels=64,
         padding=1, groups=32, channels_last=True),
    case("odd_1_in_7_out", n=3, c=5, hw=11, c_out=7, k=3, keep_in=[2], padding=1),
    case("odd_97", n=2, c=128, hw=10, c_out=97, k=3, keep_in=list(range(31, 128)), padding=1, channels_last=True),
    case("scatter_nobias", n=2, c=64, hw=12, c_out=32, k=3, keep_in=HALF, keep_out=list(range(1, 64, 2)),
         out_channels=64, padding=1, bias=False, relu=True),
]  # fmt: skip


def _backend_or_skip(name, args):
    be = {b.name: b for b in _router.PRUNED_CONV2D_BACKENDS}[name]
    why = be.unavailable(*args)
    if why:
        pytest.skip(f"{name}: {why}")


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", ["3x3", "scatter_nobias", "depthwise_cl"])
def test_gpu_residual_added_before_the_relu(backend, name):
    # the router adds the residual after the kernel (run without its ReLU), then applies the ReLU: fp32
    # against the float64 reference, unkept channels of a scattered output included
    args = make_case(**{**dict(GPU_CASES)[name], "relu": True}, device="cuda")
    _backend_or_skip(backend, args)
    y0 = ref64(args)
    res = torch.randn(y0.shape, device="cuda") * 2
    if args[0].is_contiguous(memory_format=torch.channels_last):
        res = res.contiguous(memory_format=torch.channels_last)
    with _router.use_backend(backend), torch.backends.cudnn.flags(allow_tf32=False):
        y = torch.ops.pyprune.pruned_conv2d(*args, [], 0.5, res)
    want = pruned_conv2d_ref(*to_double(args), [], 0.5, res.double())
    check_layout(y, args)
    assert (want == 0).any() and (want == 0.5).any()
    assert (y.double() - want).abs().max().item() <= fp32_tol(args)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [c[1] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES])
def test_gpu_matches_float64(backend, dtype, kw):
    args = make_case(**kw, dtype=dtype, device="cuda")
    _backend_or_skip(backend, args)
    with _router.use_backend(backend), torch.backends.cudnn.flags(allow_tf32=False):
        y = torch.ops.pyprune.pruned_conv2d(*args)
        nerr_y = naive(args)
    want = ref64(args)
    assert y.dtype == dtype and y.shape == want.shape
    check_layout(y, args)
    err = (y.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= fp32_tol(args), err
    else:
        nerr = (nerr_y.double() - want).abs().max().item()
        assert err <= 2 * nerr + 1e-6, (err, nerr)
    if kw.get("keep_out") is not None:
        outside = torch.ones(kw["out_channels"], dtype=torch.bool, device="cuda")
        outside[kw["keep_out"]] = False
        assert torch.count_nonzero(y[:, outside]) == 0


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_resnet_shape_fp16(backend, channels_last):
    # a pruned ResNet-50 stage-1 3x3 at batch 4: many M tiles, K = 32 * 9
    args = make_case(n=4, c=64, hw=56, c_out=32, k=3, keep_in=HALF, padding=1, relu=True,
                     channels_last=channels_last, dtype=torch.float16, device="cuda")  # fmt: skip
    _backend_or_skip(backend, args)
    with _router.use_backend(backend):
        y = torch.ops.pyprune.pruned_conv2d(*args)
    want = ref64(args)
    err = (y.double() - want).abs().max().item()
    nerr = (naive(args).double() - want).abs().max().item()
    assert err <= 2 * nerr + 1e-6, (err, nerr)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_triton_labels_profile_and_rejects_bad_index():
    args = make_case(**dict(GPU_CASES)["3x3"], device="cuda")
    with (
        _router.use_backend("triton"),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        torch.ops.pyprune.pruned_conv2d(*args)
    assert "pyprune::pruned_conv2d/triton" in {e.name for e in prof.events()}
    args[3] = args[3].clone()
    args[3][-1] = 64  # out of range: caught before the launch
    with _router.use_backend("triton"), pytest.raises(ValueError, match="in_index"):
        torch.ops.pyprune.pruned_conv2d(*args)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_opcheck(backend):
    args = make_case(n=2, c=12, hw=6, c_out=8, k=3, keep_in=[0, 3, 4, 7, 9, 11], keep_out=[0, 2, 3, 5, 6, 7, 8, 9],
                     out_channels=10, padding=1, relu=True, device="cuda")  # fmt: skip
    _backend_or_skip(backend, args)
    args[0].requires_grad_(True)
    args[1].requires_grad_(True)
    args[2].requires_grad_(True)
    with _router.use_backend(backend), torch.backends.cudnn.flags(allow_tf32=False):
        torch.library.opcheck(torch.ops.pyprune.pruned_conv2d.default, tuple(args))


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_torch_compile_equals_eager():
    args = make_case(**dict(GPU_CASES)["3x3_stride2_cl"], dtype=torch.float16, device="cuda")
    x, rest = args[0], args[1:]

    def f(x):
        return pruned_conv2d(x, *rest[:4], stride=rest[5], padding=rest[6], dilation=rest[7], groups=rest[8],
                             relu=True) * 2  # fmt: skip

    with _router.use_backend("triton"):
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.gpu
@pytest.mark.triton
@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("groups", [1, 4])
def test_gpu_pruned_conv2d_gradients(backend, groups):
    conv = torch.nn.Conv2d(16, 12, 3, padding=1, groups=groups)
    keep_in = [0, 1, 4, 5, 8, 9, 12, 13] if groups == 4 else [0, 2, 3, 7, 9, 15]
    keep_out = [0, 1, 3, 4, 6, 7, 9, 10] if groups == 4 else [1, 2, 5, 11]
    cpu = PrunedConv2d.from_dense(conv, keep_in, keep_out, relu=True, scatter_output=True).double()
    dev = PrunedConv2d.from_dense(conv, keep_in, keep_out, relu=True, scatter_output=True).cuda()
    x = torch.randn(2, 16, 7, 7, requires_grad=True)
    xd = x.detach().cuda().requires_grad_(True)
    _backend_or_skip(backend, [xd])
    g = torch.randn(2, 12, 7, 7)
    cpu(x.double()).backward(g.double())
    with _router.use_backend(backend), torch.backends.cudnn.flags(allow_tf32=False):
        dev(xd).backward(g.cuda())
    torch.testing.assert_close(xd.grad.cpu().double(), x.grad.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dev.weight.grad.cpu().double(), cpu.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dev.bias.grad.cpu().double(), cpu.bias.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.triton
@gpu
def test_gpu_triton_equals_cudnn_on_compacted_input():
    # the benchmark's comparison: F.conv2d on x[:, keep_in] computed ahead
    args = make_case(n=2, c=128, hw=14, c_out=64, k=3, keep_in=list(range(0, 128, 2)), padding=1,
                     dtype=torch.float16, device="cuda")  # fmt: skip
    x, w, b, ii = args[:4]
    want = F.conv2d(x[:, ii], w, b, 1, 1)
    with _router.use_backend("triton"):
        torch.testing.assert_close(torch.ops.pyprune.pruned_conv2d(*args), want, atol=2e-2, rtol=2e-2)
