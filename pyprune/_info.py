"""pyprune.info(): which backends this install has, and why not the others."""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import _extension


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if not torch.cuda.is_available():
        return False, "installed, but no CUDA device (TRITON_INTERPRET=1 runs kernels on the CPU, slowly)"
    return True, "available"


def info(print_it: bool = True) -> dict:
    """Backends and the machine they run on. Returns the dict; prints it unless ``print_it=False``."""
    feats = _extension.cpu_features()
    triton_ok, triton_why = _triton_status()
    d = {
        "pyprune": __import__("pyprune").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpp": {
            "available": _extension.HAS_CPP,
            "why": "built"
            if _extension.HAS_CPP
            else _extension.CPP_REASON + " (the CPU ops fall back to "
            "the slow reference in pyprune/reference.py)",
            "kernel_isa": feats.get("kernel_isa"),
        },
        "cuda": {
            "available": _extension.HAS_CUDA,
            "why": (
                f"extension built with CUDA {torch.version.cuda} (.cu kernels: pruned_conv2d, csr_linear, bsr_linear); CUDA tensors go "
                "through the router (pyprune.use_backend / PYPRUNE_BACKEND)"
            )
            if _extension.HAS_CUDA
            else _extension.CUDA_REASON,
        },
        "triton": {"available": triton_ok, "why": triton_why},
    }
    if print_it:
        print(
            f"pyprune {d['pyprune']}  torch {d['torch']}  python {d['python']}  {d['machine']}, "
            f"{d['cpu_threads']} threads"
        )
        for name in ("cpp", "cuda", "triton"):
            status = "yes" if d[name]["available"] else "no "
            extra = f" [{d['cpp']['kernel_isa']}]" if name == "cpp" and d["cpp"]["available"] else ""
            print(f"  {name:<7}{status}{extra}  {d[name]['why']}")
    return d
