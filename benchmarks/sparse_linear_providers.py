"""Cases and providers shared by bench_sparse_linear.py (pytest-benchmark) and sparse_linear_table.py
(interleaved rounds, the numbers in benchmarks/results/cpu/). Each provider builds its operands outside the
timed region and returns a zero-argument callable."""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import time

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


ROTATE_BYTES = 128 << 20  # several times any L3 here


def copies_for(x, nbytes: int) -> int:
    """Decoding reads each weight once per call: rotate among copies of every operand, ROTATE_BYTES in all, so a
    sparse weight that fits in the L3 and a dense one that does not are both timed from memory, as in a model
    with many layers. Many tokens reuse the weight from cache anyway: one copy."""
    return min(64, max(1, -(-ROTATE_BYTES // max(nbytes, 1)))) if x.shape[0] <= 4 else 1


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rotating(fns):
    it = [0]

    def call():
        it[0] = (it[0] + 1) % len(fns)
        return fns[it[0]]()

    return call if len(fns) > 1 else fns[0]


def torch_dense(lin, x, sparsity):
    fns = []
    for _ in range(copies_for(x, _nbytes(lin.weight))):
        w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
        fns.append(lambda w=w, b=b: F.linear(x, w, b))
    return rotating(fns)


def numpy_dense(lin, x, sparsity):
    """OpenBLAS through numpy: often faster than F.linear for GEMV."""
    xn, out = x.numpy(), np.empty((x.shape[0], lin.out_features), dtype=np.float32)
    fns = []
    for _ in range(copies_for(x, _nbytes(lin.weight))):
        w = lin.weight.detach().numpy().T.copy()
        fns.append(lambda w=w: np.matmul(xn, w, out=out))
    return rotating(fns)


def _pruned(lin, sparsity, block=None):
    w = lin.weight.detach()
    return w * (block_mask(w, sparsity, block) if block else magnitude_mask(w, sparsity))


def torch_sparse_csr(lin, x, sparsity):
    """torch.sparse CSR (MKL on CPU): y^T = W_csr @ x^T."""
    xt = x.t().contiguous()
    w = _pruned(lin, sparsity).to_sparse_csr()
    ws = [w] + [w.clone() for _ in range(copies_for(x, _nbytes(w.values(), w.col_indices())) - 1)]
    return rotating([lambda w=w: torch.mm(w, xt).t() for w in ws])


def torch_sparse_bsr32(lin, x, sparsity):
    xt = x.t().contiguous()
    w = _pruned(lin, sparsity, (32, 32)).to_sparse_bsr((32, 32))
    ws = [w] + [w.clone() for _ in range(copies_for(x, _nbytes(w.values())) - 1)]
    return rotating([lambda w=w: torch.mm(w, xt).t() for w in ws])


def _ours(layout, block=(32, 32)):
    def make(lin, x, sparsity):
        if layout == "2:4" and sparsity != 0.5:
            return None
        sp = SparseLinear.from_dense(lin, sparsity=sparsity, layout=layout, block=block).requires_grad_(False)
        nbytes = sum(_nbytes(t) for t in sp.state_dict().values() if isinstance(t, torch.Tensor))
        sps = [sp] + [copy.deepcopy(sp) for _ in range(copies_for(x, nbytes) - 1)]
        return rotating([lambda sp=sp: sp(x) for sp in sps])

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
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except OSError:
        commit = ""
    feats = pyprune._extension.cpu_features()
    return {
        "cpu": cpu,
        "kernel_isa": feats.get("kernel_isa"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
    }


def time_batch(fn, batch_s: float, clock=time.perf_counter) -> float:
    """Seconds per call of fn, over a batch of calls lasting at least batch_s (after one warm-up call)."""
    fn()
    n, t0 = 0, clock()
    while True:
        fn()
        n += 1
        el = clock() - t0
        if el >= batch_s:
            return el / n


def interleaved_samples(fns: dict, rounds: int, batch_s: float, rng, clock=time.perf_counter) -> dict:
    """Seconds per call of each fn, one sample per round (time_batch): every round times each fn once, in an
    order shuffled by ``rng``, so that the machine's drifts hit all fns alike."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        names = list(fns)
        rng.shuffle(names)
        for name in names:
            samples[name].append(time_batch(fns[name], batch_s, clock))
    return samples


def write_table(out: str, name: str, md: str, payload: dict) -> None:
    """The table scripts' results: out/name.md (md) and out/name.json (payload)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1)
