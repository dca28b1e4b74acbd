"""Cases and providers shared by bench_sparse_linear.py (pytest-benchmark) and sparse_linear_table.py
(interleaved rounds, the numbers in benchmarks/results/cpu/). Each provider builds its operands outside the
timed region and returns a zero-argument callable."""
from __future__ import annotations

import os
import platform
import subprocess

import numpy as np
import torch
import torch.nn.functional as F

import pyprune
from pyprune.nn import SparseLinear
from pyprune.sparse.select import block_mask, magnitude_mask

SHAPES = [(768, 3072), (3072, 768), (4096, 4096)]  # (in_features, out_features)
TOKENS = [1, 32, 128, 2048]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]


def dense_weight(k: int, n: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(k, n)


def torch_dense(lin, x, sparsity):
    w, b = lin.weight.detach(), lin.bias.detach()
    return lambda: F.linear(x, w, b)


def numpy_dense(lin, x, sparsity):
    """OpenBLAS through numpy: often faster than F.linear for GEMV."""
    w = lin.weight.detach().numpy().T.copy()
    xn, out = x.numpy(), np.empty((x.shape[0], w.shape[1]), dtype=np.float32)
    return lambda: np.matmul(xn, w, out=out)


def _pruned(lin, sparsity, block=None):
    w = lin.weight.detach()
    return w * (block_mask(w, block, sparsity) if block else magnitude_mask(w, sparsity))


def torch_sparse_csr(lin, x, sparsity):
    """torch.sparse CSR (MKL on CPU): y^T = W_csr @ x^T."""
    w = _pruned(lin, sparsity).to_sparse_csr()
    xt = x.t().contiguous()
    return lambda: torch.mm(w, xt).t()


def torch_sparse_bsr32(lin, x, sparsity):
    w = _pruned(lin, sparsity, (32, 32)).to_sparse_bsr((32, 32))
    xt = x.t().contiguous()
    return lambda: torch.mm(w, xt).t()


def _ours(layout, block=(32, 32)):
    def make(lin, x, sparsity):
        if layout == "2:4" and sparsity != 0.5:
            return None
        sp = SparseLinear.from_dense(lin, sparsity=sparsity, layout=layout, block=block).requires_grad_(False)
        return lambda: sp(x)
    return make


PROVIDERS = {
    "torch_dense": torch_dense,
    "numpy_dense": numpy_dense,
    "torch_sparse_csr": torch_sparse_csr,
    "torch_sparse_bsr32": torch_sparse_bsr32,
    "cpp_csr": _ours("csr"),
    "cpp_bsr32": _ours("bsr", (32, 32)),
    "cpp_bsr16": _ours("bsr", (16, 16)),
    "cpp_2:4": _ours("2:4"),
}
DENSE = ("torch_dense", "numpy_dense")


def environment() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    feats = pyprune._extension.cpu_features()
    return {"cpu": cpu, "kernel_isa": feats.get("kernel_isa"), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "git_commit": commit}
