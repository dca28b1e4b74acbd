"""What the per-op pytest-benchmarks of the sparse-weight conv ops (bench_csr_conv2d.py, bench_bsr_conv2d.py,
bench_sparse24_conv2d.py) share: one timed call of an op, or of dense F.conv2d, on a ResNet-50 conv shape
(NCHW, batch 1, stride 1, padding k // 2), with the extra_info the design asks for (shape, sparsity, dtype,
device, dense-equivalent GFLOP/s, speedup against dense timed earlier in the same run, environment)."""

import contextlib

import torch
import torch.nn.functional as F
from sparse_conv2d_table import dense_conv
from sparse_linear_providers import environment

from pyprune.nn.sparse_conv2d import tap_major

_dense_median: dict = {}


def run(benchmark, c_in, c_out, hw, k, sparsity, provider, build):
    """provider "torch_dense", or an op provider whose call ``build(w_tap_major, x)`` returns (given the dense
    tap-major (c_out, k*k*c_in) weight, which it prunes to ``sparsity`` itself); "..._inference_mode"
    providers run under torch.inference_mode."""
    conv = dense_conv(c_in, c_out, k)
    w = conv.weight.detach()
    x = torch.randn(1, c_in, hw, hw, generator=torch.Generator().manual_seed(1))
    fn = (lambda: F.conv2d(x, w, None, 1, k // 2)) if provider == "torch_dense" else build(tap_major(w), x)
    with (
        torch.inference_mode() if provider.endswith("_inference_mode") else contextlib.nullcontext(),
        torch.no_grad(),
    ):
        y = benchmark(fn)
    assert y.shape == (1, c_out, hw, hw)
    flops = 2.0 * hw * hw * c_in * c_out * k * k
    key = (c_in, c_out, hw, k)
    info = {
        "shape": {"c_in": c_in, "c_out": c_out, "hw": hw, "kernel": k, "batch": 1},
        "dtype": "float32",
        "sparsity": 0.0 if provider == "torch_dense" else sparsity,
        "device": "cpu",
        **environment(),
    }
    if benchmark.stats is not None:
        info["dense_equivalent_gflops"] = flops / benchmark.stats.stats.median / 1e9
    info.update(against_dense(benchmark, key, provider == "torch_dense", _dense_median))
    benchmark.extra_info.update(info)


def against_dense(benchmark, key, dense: bool, medians: dict) -> dict:
    """A dense provider's median is kept in ``medians`` under ``key``; a later provider with the same key gets
    {"speedup_vs_torch_dense": dense median / its median}. Nothing when timing is disabled."""
    if benchmark.stats is None:
        return {}
    med = benchmark.stats.stats.median
    if dense:
        medians[key] = med
    return {"speedup_vs_torch_dense": medians[key] / med} if not dense and key in medians else {}
