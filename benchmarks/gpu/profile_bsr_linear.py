"""One BSR linear case on the GPU, for profilers: times ours (Triton) and cuBLAS with do_bench, prints the
autotuner's pick, then launches ours --launches more times (the launches ncu should capture).

    python benchmarks/gpu/profile_bsr_linear.py --dtype float16 --m 2048 --k 4096 --n 4096 --block 64 --sparsity 0.9
    ncu --clock-control none -k regex:bsr_linear --launch-skip 20 --launch-count 1 --section SpeedOfLight \
        python benchmarks/gpu/profile_bsr_linear.py ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--launches", type=int, default=5)
    args = ap.parse_args(argv)

    import triton.testing

    from pyprune.ops._router import load_triton_kernels
    from pyprune.sparse import BSR
    from pyprune.sparse.select import block_mask

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    w = torch.randn(args.n, args.k, device="cuda")
    w = (w * block_mask(w, args.sparsity, (args.block, args.block))).to(dtype)
    f = BSR.from_dense(w.float(), (args.block, args.block)).to("cuda")
    crow, col, vals = f.crow_indices, f.col_indices, f.values.detach().to(dtype)
    x = torch.randn(args.m, args.k, device="cuda", dtype=dtype)
    kernels, why = load_triton_kernels()
    if kernels is None:
        sys.exit(f"Triton kernels unavailable: {why}")
    run = lambda: kernels.bsr_linear_triton(x, crow, col, vals, args.n)  # noqa: E731
    err = (
        (run().float() - F.linear(x.float(), w.float())).norm() / F.linear(x.float(), w.float()).norm()
    ).item()
    ours = triton.testing.do_bench(run, warmup=50, rep=200, return_mode="median")
    dense = triton.testing.do_bench(lambda: F.linear(x, w), warmup=50, rep=200, return_mode="median")
    best = getattr(kernels.bsr_linear._bsr_linear_fwd_kernel, "best_config", None)  # the module holds it
    print(
        f"{args.dtype} M={args.m} {args.k}->{args.n} block {args.block} sparsity {args.sparsity}: "
        f"ours {ours * 1e3:.1f} us, cuBLAS {dense * 1e3:.1f} us, ratio {dense / ours:.2f}x, rel err {err:.1e}, "
        f"config {best}"
    )
    for _ in range(args.launches):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
