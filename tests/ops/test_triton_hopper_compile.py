"""Every Triton kernel compiles for Hopper (sm_90) on this CPU machine: a stand-in CUDA driver reports an sm_90
target, and the launchers run on CPU tensors with each kernel call turned into a compile (warmup) through
Triton's own ptxas, no launch. The interpreter (TRITON_INTERPRET=1, the other Triton tests) never compiles, so
it misses what only the compiler sees: an int argument equal to 1 becomes a constexpr on a GPU, which broke
the depthwise conv kernel at dilation 1 (``(r * DIL_H).to(...)`` on a Python int)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .triton_interp import HAS_TRITON

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import os
os.environ["PYPRUNE_TRITON_AUTOTUNE"] = "0"  # one config per kernel
import torch
try:
    import triton.backends.nvidia  # noqa: F401  (the backend with ptxas)
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
except ImportError as exc:
    print("SKIP", exc)
    raise SystemExit(0)


class Hopper:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


driver.set_active(Hopper())
compiled = []
run = JITFunction.run


def compile_only(self, *args, grid, warmup, **kw):
    kernel = run(self, *args, grid=grid, warmup=True, **kw)
    assert "cubin" in kernel.asm, self.fn.__name__
    # what a launch on an H100 would refuse: more shared memory than a block may opt in to (227 KiB)
    assert kernel.metadata.shared <= 232448, (self.fn.__name__, kernel.metadata.shared)
    compiled.append(self.fn.__name__)
    return kernel


JITFunction.run = compile_only
from pyprune_kernels import bsr_conv2d as bc, bsr_linear as bl, csr_conv2d as cc, pruned_conv2d as pc

for dt in (torch.float16, torch.bfloat16, torch.float32):
    # (inputs per group, groups, dilation, stride, channels_last, index tensors): depthwise at dilation 1 and 2
    for cin_g, groups, dil, stride, cl, idx in ((1, 8, 1, 1, False, False), (1, 8, 2, 2, True, True),
                                                (4, 1, 1, 1, False, False), (4, 1, 2, 2, True, True),
                                                (8, 2, 1, 1, False, True)):
        cin = cin_g * groups
        x = torch.randn(2, cin + 2 if idx else cin, 9, 9, dtype=dt)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(8, cin_g, 3, 3, dtype=dt)
        in_idx = torch.arange(cin) if idx else None
        out_idx = torch.arange(8) * 2 if idx else None
        pc.pruned_conv2d_triton(x, w, torch.randn(8, dtype=dt), in_idx, out_idx, 16 if idx else 8, (stride, stride),
                                (1, 1), (dil, dil), groups, True)
    for dil in (1, 2):
        x = torch.randn(1, 6, 9, 9, dtype=dt)
        w = torch.randn(5, 3 * 3 * 6, dtype=dt).to_sparse_csr()
        cc.csr_conv2d_triton(x, w.crow_indices().int(), w.col_indices().int(), w.values(), 5, (3, 3),
                             torch.randn(5, dtype=dt), (1, 1), (1, 1), (dil, dil))
    # bsr_conv2d: blocks inside one tap (TAP_BLOCKS) and across taps (a 160 x 96 block: two row sub-tiles and
    # two column chunks), NCHW and channels_last
    for cin, cout, bh, bw, cl in ((64, 48, 32, 32, False), (64, 48, 16, 64, True), (40, 160, 160, 96, False),
                                  (12, 20, 8, 24, True)):
        x = torch.randn(2, cin, 9, 9, dtype=dt)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        rows, cols = -(-cout // bh), -(-9 * cin // bw)
        crow = torch.arange(rows + 1, dtype=torch.int32) * cols
        col = torch.arange(cols, dtype=torch.int32).repeat(rows)
        bc.bsr_conv2d_triton(x, crow, col, torch.randn(rows * cols, bh, bw, dtype=dt), cout, (3, 3),
                             torch.randn(cout, dtype=dt), (1, 1), (1, 1), (1, 1), allow_tf32=True)
    # blocks wider than a 64-column chunk (256: its shared memory grew with the block's width, 384 KiB in fp32
    # with tf32, until the chunks became one flat loop)
    for m, n, k, bh, bw, schedule in ((8, 96, 80, 32, 32, "rows"), (8, 96, 80, 32, 32, "balanced"),
                                      (1, 64, 64, 16, 16, "rows"), (300, 100, 70, 48, 24, "rows"),
                                      (64, 256, 256, 256, 256, "rows")):
        x = torch.randn(m, k, dtype=dt)
        rows, cols = -(-n // bh), -(-k // bw)
        crow = torch.arange(rows + 1, dtype=torch.int32) * cols
        col = torch.arange(cols, dtype=torch.int32).repeat(rows)
        values = torch.randn(rows * cols, bh, bw, dtype=dt)
        bl.bsr_linear_triton(x, crow, col, values, n, torch.randn(n, dtype=dt), schedule=schedule, split_blocks=1,
                             allow_tf32=True)
        bl.bsr_linear_grad_values_triton(torch.randn(m, n, dtype=dt), x, crow, col, bh, bw, allow_tf32=True)
print("compiled", len(compiled), " ".join(sorted(set(compiled))))
"""


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_every_triton_kernel_compiles_for_sm90():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"this Triton cannot compile for CUDA here: {out.stdout.strip()}")
    count, names = out.stdout.split()[1], out.stdout.split()[2:]
    assert int(count) == 3 * (5 + 2 + 4 + 5 * 2), out.stdout
    assert names == sorted([
        "_bsr_conv2d_fwd_kernel", "_bsr_linear_fwd_kernel", "_bsr_linear_grad_values_kernel",
        "_csr_conv2d_fwd_kernel", "_pruned_conv2d_dw_kernel", "_pruned_conv2d_fwd_kernel",
    ])  # fmt: skip
