import json
from pathlib import Path

import pytest
import torch

from pyprune.cli import main
from pyprune.compare.profile import layer_ranges, op_backend, write_trace
from pyprune.models import lenet5


def test_op_backend_names_the_compiled_kernel():
    from pyprune import _extension

    expected = "cpp" if _extension.HAS_CPP else "python"
    assert op_backend("csr_linear") == expected
    assert op_backend("no_such_op") == "none"


def test_trace_has_layer_and_pyprune_ranges(tmp_path):
    import pyprune

    torch.manual_seed(0)
    model = pyprune.convert(pyprune.sparsify(lenet5().eval(), 0.5), layout="csr").eval()
    x = torch.randn(1, 1, 32, 32)
    path = write_trace({"csr": model}, (x,), tmp_path / "t.json")
    names = {e.get("name") for e in json.loads(Path(path).read_text())["traceEvents"]}
    assert "variant csr" in names
    assert "layer fc1 (SparseLinear)" in names
    assert f"pyprune::csr_linear/{op_backend('csr_linear')}" in names
    # the hooks are gone afterwards
    with layer_ranges(model):
        pass
    assert not model.fc1._forward_pre_hooks and not model.fc1._forward_hooks


@pytest.mark.slow
def test_cli_profile_and_advise(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    argv = ["profile", "--model", "lenet5", "--method", "csr", "--level", "0.75", "--threads", "1"]
    assert main(argv + ["--trace", str(trace), "--repeats", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "break-even" in out and "fc1" in out and "whole model" in out
    assert json.loads(trace.read_text())["traceEvents"]
    argv = ["advise", "--model", "lenet5", "--levels", "0.5", "--methods", "csr", "bsr", "--rounds", "2"]
    assert main(argv + ["--budget", "1", "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fastest whole model" in out and "conv1:" in out


def test_cli_advise_needs_a_pruned_form(capsys):
    # --methods dense timed dense alone and printed an empty advice section
    assert main(["advise", "--model", "lenet5", "--methods", "dense", "--no-progress"]) == 2
    assert "--methods: name at least one pruned form" in capsys.readouterr().err
