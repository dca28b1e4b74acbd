"""setup.py's choice of a CUDA build (_want_cuda), with torch's CUDA facts stood in for."""

import types
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def want_cuda(monkeypatch, tmp_path, *, cuda_version, cuda_home, flag=""):
    source = SETUP.read_text().split("with_cuda, cuda_reason = _want_cuda()")[0]  # the definitions only
    scope = {"__file__": str(SETUP)}
    exec(compile(source, str(SETUP), "exec"), scope)
    scope["torch"] = types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda_version), __version__="x")
    scope["CUDA_HOME"] = cuda_home
    monkeypatch.setenv("PYPRUNE_CUDA", flag)
    monkeypatch.delenv("CUDA_INC_PATH", raising=False)
    return scope["_want_cuda"]()


def test_cuda_home_without_headers_is_refused_up_front(monkeypatch, tmp_path):
    # torch guesses CUDA_HOME from nvcc's path: a wrapper in /usr/local/bin gave /usr/local, and the build
    # failed minutes in on a missing cuda_runtime.h
    assert want_cuda(monkeypatch, tmp_path, cuda_version="13.0", cuda_home=str(tmp_path)) == (
        False,
        f"no cuda_runtime.h under CUDA_HOME={tmp_path}/include or CUDA_INC_PATH "
        "(set CUDA_HOME to the toolkit)",
    )
    with pytest.raises(RuntimeError, match="PYPRUNE_CUDA=1 but no cuda_runtime.h"):
        want_cuda(monkeypatch, tmp_path, cuda_version="13.0", cuda_home=str(tmp_path), flag="1")
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert want_cuda(monkeypatch, tmp_path, cuda_version="13.0", cuda_home=str(tmp_path)) == (
        True,
        "built with CUDA 13.0",
    )


def test_cpu_torch_and_the_off_switch(monkeypatch, tmp_path):
    assert want_cuda(monkeypatch, tmp_path, cuda_version=None, cuda_home=None)[0] is False
    assert want_cuda(monkeypatch, tmp_path, cuda_version="13.0", cuda_home=str(tmp_path), flag="0") == (
        False,
        "disabled by PYPRUNE_CUDA=0",
    )
