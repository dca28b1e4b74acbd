import subprocess
import sys

import pyprune


def test_info_reports_every_backend_with_a_reason():
    d = pyprune.info(print_it=False)
    for name in ("cpp", "cuda", "triton"):
        assert isinstance(d[name]["available"], bool)
        assert d[name]["why"]
    assert d["cpp"]["available"] == pyprune._extension.HAS_CPP


def test_cli_info_prints_backends():
    out = subprocess.run(
        [sys.executable, "-m", "pyprune.cli", "info"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "cpp" in out.stdout and "cuda" in out.stdout and "triton" in out.stdout
