"""Smoke test of isa_paths_table.py (every SIMD path of the C++ kernels in its own process): one short round
per path, checking that each path ran, on the ISA it was asked for, every case. The figures in
benchmarks/results/ come from the script itself with its default rounds."""

import json

import pytest
from isa_paths_table import CASES, main

import pyprune


@pytest.mark.skipif(not pyprune._extension.HAS_CPP, reason="pyprune._C is not built")
def test_isa_paths_table_times_every_path(tmp_path):
    assert main(["--rounds", "1", "--batch-ms", "1", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "isa_paths.json").read_text())
    have = pyprune._extension.cpu_features()
    want = ["baseline"] + [i for i in ("avx2", "avx512") if have[i]]
    assert list(got["isas"]) == want
    for isa in want:
        rows = got["isas"][isa]
        assert [r["case"] for r in rows] == [name for name, _, _ in CASES]
        assert all(r["ours_median_s"] > 0 and r["dense_median_s"] > 0 for r in rows)
    md = (tmp_path / "isa_paths.md").read_text()
    assert all(name in md for name, _, _ in CASES)
