"""pytest-benchmark: PrunedConv2d (pyprune::pruned_conv2d, fused channel gather) vs dense F.conv2d and oneDNN on a
pre-compacted input, on ResNet-50 conv shapes; its fused max pool vs ATen's pool after it; MobileNetV2's
depthwise 3x3 + ReLU6 vs ATen's.

CI runs this with --benchmark-disable (each case once, as a smoke test). The numbers quoted in
benchmarks/results/cpu/ come from pruned_conv2d_table.py, max_pool_table.py and depthwise_table.py, which
interleave providers and repeat rounds.
"""

import pytest
import torch
from depthwise_table import CASES as DEPTHWISE_CASES
from depthwise_table import providers as depthwise_providers
from max_pool_table import CASES as POOL_CASES
from max_pool_table import providers as pool_providers
from pruned_conv2d_table import SHAPES, environment, providers

_dense_median: dict = {}
PROVIDERS = ("dense", "onednn_compact", "ours", "ours_compact")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("keep", [0.5, 0.25])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("batch", [1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-k{s[2]}-{s[3]}")
def test_pruned_conv2d(benchmark, shape, batch, channels_last, keep, provider):
    if provider == "dense" and keep != 0.5:
        pytest.skip("dense does not depend on keep: timed once per shape")
    cin, cout, k, side = shape
    fns, _ = providers(cin, cout, k, side, batch, keep, channels_last, torch.Generator().manual_seed(0))
    with torch.no_grad():
        benchmark(fns[provider])
    kept = round(cin * keep) * round(cout * keep) if provider != "dense" else cin * cout
    flops = 2.0 * batch * side * side * k * k * kept
    key = (shape, batch, channels_last)
    info = {"shape": shape, "batch": batch, "keep": keep, "format": "channels_last" if channels_last else "nchw",
            "dtype": "float32", "device": "cpu", **environment()}  # fmt: skip
    if benchmark.stats is not None:
        med = benchmark.stats.stats.median
        info["gflops"] = flops / med / 1e9
        if provider == "dense":
            _dense_median[key] = med
        elif key in _dense_median:
            info["speedup_vs_dense"] = _dense_median[key] / med
            info["ideal"] = 1 / (keep * keep)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("provider", ("aten", "ours_aten_pool", "ours_fused"))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c[0].replace(" ", "-"))
def test_pruned_conv2d_max_pool(benchmark, case, channels_last, provider):
    """The fused max pool (max_pool_table.py) against the same conv followed by ATen's pool, batch 1."""
    fns = pool_providers(case, 1, 1.0, channels_last, torch.Generator().manual_seed(0))
    with torch.no_grad():
        benchmark(fns[provider])
    fmt = "channels_last" if channels_last else "nchw"
    info = {"case": case[0], "format": fmt, "batch": 1, "dtype": "float32", "device": "cpu", **environment()}
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("provider", ("aten", "ours"))
@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: f"dw{c[0]}-{c[1]}-s{c[2]}")
def test_pruned_conv2d_depthwise(benchmark, case, channels_last, keep, provider):
    """MobileNetV2's depthwise 3x3 + ReLU6 (depthwise_table.py), batch 1: ours with the gather and ReLU6 fused
    against F.conv2d + F.relu6 on the compacted input."""
    fns = depthwise_providers(case, 1, keep, channels_last, torch.Generator().manual_seed(0))
    with torch.no_grad():
        benchmark(fns[provider])
    fmt = "channels_last" if channels_last else "nchw"
    info = {"case": case, "keep": keep, "format": fmt, "batch": 1, "dtype": "float32", "device": "cpu",
            **environment()}  # fmt: skip
    benchmark.extra_info.update(info)
