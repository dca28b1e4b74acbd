"""Loads the compiled extension ``pyprune._C`` if it was built.

Importing pyprune never fails because a backend is missing: the reason is kept in ``CPP_REASON`` and
raised by :func:`require_cpp` when an op needs the C++ kernels.
"""

from __future__ import annotations

import os

import torch

ISA_CAPS = ("baseline", "avx2", "avx512")
_isa_cap = os.environ.get("PYPRUNE_ISA")
if _isa_cap and _isa_cap not in ISA_CAPS:
    # read once by _C when it loads (below); an unknown value would silently leave the widest path on
    raise ValueError(
        f"environment variable PYPRUNE_ISA must be one of {', '.join(ISA_CAPS)} (or unset or empty), "
        f"got {_isa_cap!r}"
    )

HAS_CPP = False
CPP_REASON = ""
HAS_CUDA = False
CUDA_REASON = ""

try:
    from . import _C  # noqa: F401  (loading the .so runs the TORCH_LIBRARY_IMPL registrations)

    HAS_CPP = True
except ImportError as e:  # not built, or built against another torch
    CPP_REASON = (
        f"pyprune._C could not be loaded ({e}). Build it with "
        "`pip install --no-build-isolation -e .` in the pyprune checkout (needs a C++ compiler and torch)."
    )

if HAS_CPP:
    HAS_CUDA = bool(_C.cpu_features()["with_cuda"])
    if not HAS_CUDA:
        CUDA_REASON = (
            "the extension was built without CUDA sources (needs nvcc and a CUDA build of torch at build time)"
            if torch.version.cuda
            else f"torch {torch.__version__} is a CPU build"
        )
else:
    CUDA_REASON = CPP_REASON


def require_cpp(op: str) -> None:
    if not HAS_CPP:
        raise RuntimeError(f"pyprune::{op} needs the C++ backend: {CPP_REASON}")


def cpu_features() -> dict:
    """The SIMD level the C++ kernels dispatch to on this CPU (empty when _C is missing)."""
    if not HAS_CPP:
        return {}
    return dict(_C.cpu_features())
