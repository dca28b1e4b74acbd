import math

import pytest

from pyprune.compare.roofline import balance, break_even, explain, measure_peak, place

PEAK = {"peak_gflops": 100.0, "copy_gbps": 10.0}  # balance 10 FLOP/B


def test_place_compute_bound():
    # 1 GFLOP over 10 MB: intensity 100 > 10, floor = 1e9 / 1e11 = 10 ms; run in 20 ms
    p = place(1e9, 1e7, 0.02, PEAK)
    assert p["bound"] == "compute"
    assert p["intensity"] == pytest.approx(100.0)
    assert p["floor_s"] == pytest.approx(0.01)
    assert p["frac_roofline"] == pytest.approx(0.5)
    assert p["achieved_gflops"] == pytest.approx(50.0)
    assert p["frac_peak"] == pytest.approx(0.5)


def test_place_memory_bound():
    # 10 MFLOP over 100 MB: intensity 0.1, floor = 1e8 / 1e10 = 10 ms; run in 100 ms
    p = place(1e7, 1e8, 0.1, PEAK)
    assert p["bound"] == "memory"
    assert p["floor_s"] == pytest.approx(0.01)
    assert p["frac_roofline"] == pytest.approx(0.1)
    text = explain(p, PEAK)
    assert text.startswith("memory-bound") and "balance 10.0" in text and "far below both roofs" in text
    assert balance(PEAK) == pytest.approx(10.0)


def test_explain_compute_near_roof():
    p = place(1e9, 1e7, 0.0125, PEAK)
    text = explain(p, PEAK)
    assert text.startswith("compute-bound") and "80% of its roofline" in text and "far below" not in text
    assert "80% of the dense matmul rate" in text


def test_break_even_one_level_is_proportional():
    # sparse at 0.9 takes 2 ms (density 0.1 -> 20 ms per unit density); dense 10 ms -> density 0.5
    assert break_even(0.010, [(0.9, 0.002)]) == pytest.approx(0.5)


def test_break_even_fit_with_fixed_cost():
    # t = 1 ms + 10 ms * density, exactly: dense 6 ms -> density 0.5
    pts = [(s, 0.001 + 0.010 * (1 - s)) for s in (0.5, 0.75, 0.9)]
    assert break_even(0.006, pts) == pytest.approx(0.5)
    # already faster than dense at density 1
    assert break_even(0.020, pts) == 0.0
    # fixed cost above dense: never breaks even
    assert break_even(0.0005, pts) is None
    # a kernel that gets slower with sparsity has no break-even
    assert break_even(0.005, [(0.5, 0.001), (0.9, 0.002)]) is None
    assert break_even(0.005, []) is None


def test_measure_peak_small():
    peak = measure_peak(1, n=128, copy_mib=4, repeats=2)
    assert peak["peak_gflops"] > 0 and math.isfinite(peak["peak_gflops"])
    assert peak["copy_gbps"] > 0 and math.isfinite(peak["copy_gbps"])
    assert (peak["matmul_n"], peak["copy_mib"]) == (128, 4)
    # the peak is the faster of the two dense engines, and says which one that was
    assert peak["mm_gflops"] > 0 and peak["conv1x1_gflops"] > 0
    assert peak["peak_gflops"] == max(peak["mm_gflops"], peak["conv1x1_gflops"])
    engine = "conv1x1" if peak["conv1x1_gflops"] > peak["mm_gflops"] else "mm"
    assert peak["peak_engine"] == engine
    with pytest.raises(ValueError, match="repeats"):
        measure_peak(1, repeats=0)


def test_explain_flags_a_rate_above_the_measured_peak():
    p = place(2e9, 1e7, 0.01, PEAK)  # 200 GFLOP/s against a 100 GFLOP/s peak
    assert p["frac_peak"] == pytest.approx(2.0)
    assert "measurement was disturbed" in explain(p, PEAK)
