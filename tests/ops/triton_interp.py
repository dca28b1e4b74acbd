"""A kernels/ module loaded under the Triton interpreter, for the CPU tests of the Triton kernels, and the
helpers the conv kernels' tests share."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _index_takes_one_element_arrays():
    """Triton 3.6's interpreter turns a scalar tensor into an int (``range(start, end)`` over loaded bounds)
    with ``int(handle.data)`` on a shape-(1,) array, a TypeError since NumPy 2.4 (triton-lang/triton#9171,
    fixed by #9172; 3.9 has the fix). Re-patches ``__index__`` after the interpreter's own patch; its scope
    restores both, last first. A Triton without the private hook keeps its own."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_pyprune_index", False):
        return

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._pyprune_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


def load_interpreted(name: str):
    """kernels/<name>.py executed again with TRITON_INTERPRET=1, as a module of its own inside the installed
    pyprune_kernels (so its relative imports resolve; that package's own modules stay compiled); the
    variable is restored afterwards."""
    import pyprune_kernels  # noqa: F401  (the parent package of the interpreted copy)

    _index_takes_one_element_arrays()

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(
            f"pyprune_kernels._{name}_interpreted", KERNELS / f"{name}.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    assert mod.INTERPRET
    return mod


def interp_fixture(name: str):
    """A module-scoped pytest fixture giving load_interpreted(name), skipped without triton."""

    @pytest.fixture(scope="module")
    def interp():
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        return load_interpreted(name)

    return interp


def case(name, **kw):
    """(id, make_case keyword arguments)"""
    return name, kw


def to_double(args):
    """An op's positional arguments with every floating tensor in float64 (for the reference)."""
    return [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]


def check_layout(y, args):
    """y has the memory format F.conv2d gives for x = args[0]."""
    x = args[0]
    want_cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)


def set_arg(i, v):
    """A change to an op's argument list (for the bad-input tables): argument i becomes v, or v(args)."""

    def change(a):
        a[i] = v(a) if callable(v) else v

    return change
