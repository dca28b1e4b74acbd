"""Interleaved timing of one training step (forward + backward, gradients for x, the kept weights and the
bias) of SparseConv2d (csr, bsr) against nn.Conv2d on ResNet-50 conv shapes, written as markdown + JSON.

Each round times every provider once, in shuffled order (a batch of steps of >= --batch-ms); figures are
medians over rounds, and "x dense" is the median of the same-round ratios. The step: y = conv(x);
y.backward(g) with x requiring grad (every conv of a network but the first needs its input's gradient), the
gradients zeroed between steps (not timed). With --dense-backward, "csr / bsr, dense bw" run the same modules
with the backward of before: the input gradient through ATen's conv2d_input on the densified weight and the
values' gradient read from ATen's dense weight gradient, so both backwards are timed in one run. With
--device cuda the modules and tensors live on the GPU and every step ends in a synchronize (the device suite
runs it so: cuDNN's conv against the routers' Triton kernels, and, with --dense-backward, the same steps with
cuDNN's backward).
    python benchmarks/sparse_conv2d_train_table.py [--rounds 5] [--dense-backward] [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import random
import statistics

import torch
from sparse_linear_providers import environment, interleaved_samples, write_table
from sparse_linear_train_table import step_fn

from pyprune.nn import SparseConv2d

# (C_in, C_out, kernel, input feature map side, stride): ResNet-50's stride-1 convs, a downsampling 1x1 and
# the strided 3x3s that open layers 2-4
SHAPES = [
    (64, 64, 3, 56, 1),
    (256, 64, 1, 56, 1),
    (128, 128, 3, 28, 1),
    (256, 256, 3, 14, 1),
    (512, 512, 3, 7, 1),
    (1024, 256, 1, 14, 1),
    (2048, 512, 1, 7, 1),
    (512, 1024, 1, 28, 2),
    (128, 128, 3, 56, 2),
    (256, 256, 3, 28, 2),
    (512, 512, 3, 14, 2),
]
SPARSITIES = [0.5, 0.7, 0.9]
_csr_conv2d = importlib.import_module("pyprune.ops.csr_conv2d")  # (pyprune.ops.csr_conv2d: the function)
_bsr_conv2d = importlib.import_module("pyprune.ops.bsr_conv2d")


@contextlib.contextmanager
def dense_backward():
    """The sparse conv ops' backward through ATen's dense conv gradients (input and weight)."""
    phases, density = _csr_conv2d.input_grad_phases, _csr_conv2d.SAMPLED_MAX_DENSITY
    bsr_density = _bsr_conv2d.BSR_KXK_SAMPLED_MAX_DENSITY
    _csr_conv2d.input_grad_phases, _csr_conv2d.SAMPLED_MAX_DENSITY = (lambda *args: None), -1.0
    _bsr_conv2d.BSR_KXK_SAMPLED_MAX_DENSITY = -1.0
    try:
        yield
    finally:
        _csr_conv2d.input_grad_phases, _csr_conv2d.SAMPLED_MAX_DENSITY = phases, density
        _bsr_conv2d.BSR_KXK_SAMPLED_MAX_DENSITY = bsr_density


def dense_backward_step(step):
    def run():
        with dense_backward():
            step()

    return run


def synchronized(step, device: torch.device):
    """step, then a wait for the GPU's queue on CUDA (so that wall-clock timing counts the kernels)."""
    if device.type != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize(device)

    return run


def run_case(c_in, c_out, k, hw, stride, sparsity, batch, rounds, batch_s, with_dense_bw, rng, device):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)
    layers = {"dense": conv}
    for layout in ("csr", "bsr"):
        layers[layout] = SparseConv2d.from_dense(conv, sparsity=sparsity, layout=layout)
    layers = {name: layer.to(device) for name, layer in layers.items()}
    x = torch.randn(batch, c_in, hw, hw, device=device, requires_grad=True)
    g = torch.randn_like(layers["dense"](x))
    fns = {name: synchronized(step_fn(layer, x, g), device) for name, layer in layers.items()}
    if with_dense_bw:
        for layout in ("csr", "bsr"):
            fns[f"{layout}, dense bw"] = dense_backward_step(fns[layout])
    samples = interleaved_samples(fns, rounds, batch_s, rng)
    return {
        "c_in": c_in, "c_out": c_out, "kernel": k, "hw": hw, "stride": stride, "batch": batch,
        "sparsity": sparsity,
        "median_s": {name: statistics.median(s) for name, s in samples.items()},
        "vs_dense": {
            name: statistics.median(d / t for d, t in zip(samples["dense"], s))
            for name, s in samples.items() if name != "dense"
        },
    }  # fmt: skip


def markdown(rows, env) -> str:
    names = list(rows[0]["vs_dense"]) if rows else []
    lines = [
        (
            f"# One training step (forward + backward): SparseConv2d vs nn.Conv2d ({env['device']})\n\n"
            f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, commit {env['git_commit']}, "
            "fp32, NCHW, bsr blocks 32x32. Medians over interleaved rounds; x dense = median of same-round "
            "ratios (> 1: faster).\n"
        ),
        "| conv | batch | sparsity | dense ms | " + " | ".join(f"{n} ms | {n} x dense" for n in names) + " |",
        "|---|---:|---:|---:|" + "---:|---:|" * len(names),
    ]
    for r in rows:
        conv = f"{r['c_in']}->{r['c_out']} {r['kernel']}x{r['kernel']} @{r['hw']}"
        if r["stride"] != 1:
            conv += f" s{r['stride']}"
        cells = " | ".join(f"{1e3 * r['median_s'][n]:.2f} | {r['vs_dense'][n]:.2f}" for n in names)
        lines.append(
            f"| {conv} | {r['batch']} | {r['sparsity']} | {1e3 * r['median_s']['dense']:.2f} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-ms", type=float, default=50.0)
    ap.add_argument("--batch", type=int, default=8, help="images per step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current)")
    ap.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES (default: all)")
    ap.add_argument("--sparsities", type=float, nargs="*", default=SPARSITIES)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dense-backward", action="store_true", help="also time the backward through ATen")
    ap.add_argument("--quick", action="store_true", help="three small shapes at batch 1, 90%%, 2 rounds")
    ap.add_argument("--out", default=None, help="directory for sparse_conv2d_train.md / .json")
    ap.add_argument("--name", default="sparse_conv2d_train", help="file name stem under --out")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
    sparsities = args.sparsities
    if args.quick:
        shapes, sparsities = [(16, 16, 3, 8, 1), (32, 64, 1, 8, 2), (16, 16, 3, 9, 2)], [0.9]
        args.rounds, args.batch = 2, 1
    rng = random.Random(0)
    device = torch.device(args.device)
    env = environment()
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for shape in shapes:
        for sp in sparsities:
            rows.append(
                run_case(
                    *shape, sp, args.batch, args.rounds, args.batch_ms / 1e3, args.dense_backward, rng, device
                )
            )
            print(markdown(rows[-1:], env).splitlines()[-1], flush=True)
    md = markdown(rows, env)
    if args.out:
        write_table(args.out, args.name, md, {"environment": env, "rows": rows})
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
