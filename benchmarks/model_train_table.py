"""Interleaved timing of one training step of a whole zoo model: forward, a loss, backward and an SGD step,
dense against the same model pruned to one sparsity. Variants, each timed once per round in shuffled order
(a batch of steps of >= --batch-ms), figures as medians over rounds and "x dense" as the median of same-round
ratios:

- dense: the model as built;
- masked: ``pyprune.sparsify`` (unstructured, per layer), i.e. a dense weight times its mask every step, as
  torch.nn.utils.prune trains;
- csr / bsr: every Conv2d and Linear replaced by ``SparseConv2d`` / ``SparseLinear.from_dense(...,
  sparsity=..., layout=...)`` (bsr in 32x32 tiles), whose backward computes the input gradient through the
  sparse kernels and the stored values' gradient alone (see pyprune/ops/csr_conv2d.py);
- auto: the masked model through ``pyprune.convert(..., layout="auto", train=True)``, each layer in the form
  whose forward + backward was fastest on its input (for these unstructured masks: dense or csr).

BatchNorm and everything else stays as it is; the model trains (train mode), so BN uses batch statistics.
    python benchmarks/model_train_table.py [--model resnet50] [--batch 8] [--sparsity 0.9] [--rounds 5]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from sparse_linear_providers import environment, interleaved_samples, write_table
from torch import nn

import pyprune
from pyprune.compare.cli import MODELS, model_and_inputs
from pyprune.nn import SparseConv2d, SparseLinear
from pyprune.pruning.masks import copy_of


def sparse_copy(model: nn.Module, sparsity: float, layout: str) -> nn.Module:
    """A copy of ``model`` with every Conv2d / Linear as SparseConv2d / SparseLinear in ``layout``."""
    out = copy_of(model)
    for name, layer in list(out.named_modules()):
        if isinstance(layer, nn.Conv2d):
            new = SparseConv2d.from_dense(layer, sparsity=sparsity, layout=layout)
        elif isinstance(layer, nn.Linear):
            new = SparseLinear.from_dense(layer, sparsity=sparsity, layout=layout)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, new)
    return out


def step_fn(model: nn.Module, inputs: tuple):
    """One training step: the output's mean square as the loss, backward, SGD (lr small enough to keep the
    weights where they are for the length of a benchmark)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-9)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        opt.step()

    return step


def variants(model: nn.Module, sparsity: float, inputs: tuple) -> dict:
    """The model as built, masked, as csr and bsr, and converted per layer for training (see the module
    docstring), all in train mode."""
    masked = pyprune.sparsify(model, sparsity=sparsity)
    return {
        "dense": model.train(),
        "masked": masked.train(),
        "csr": sparse_copy(model, sparsity, "csr").train(),
        "bsr": sparse_copy(model, sparsity, "bsr").train(),
        "auto": pyprune.convert(masked, layout="auto", example_inputs=inputs, train=True).train(),
    }


def run(name, batch, image, sparsity, rounds, batch_s, rng) -> dict:
    torch.manual_seed(0)
    model, inputs = model_and_inputs(name, batch=batch, image=image)
    fns = {v: step_fn(m, inputs) for v, m in variants(model, sparsity, inputs).items()}
    samples = interleaved_samples(fns, rounds, batch_s, rng)
    return {
        "model": name, "batch": batch, "image": image, "sparsity": sparsity, "rounds": rounds,
        "median_s": {v: statistics.median(s) for v, s in samples.items()},
        "vs_dense": {
            v: statistics.median(d / t for d, t in zip(samples["dense"], s)) for v, s in samples.items()
        },
        "spread": {v: (max(s) - min(s)) / statistics.median(s) for v, s in samples.items()},
    }  # fmt: skip


def markdown(rows, env) -> str:
    lines = [
        "# One training step of a whole model: dense vs pruned (CPU)\n",
        f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, commit {env['git_commit']}, fp32, NCHW. "
        "Step = forward, mean-square loss, backward, SGD. masked: dense weights times masks "
        "(torch.nn.utils.prune's way); csr / bsr: SparseConv2d / SparseLinear (bsr 32x32); auto: the masks "
        "converted per layer to the form fastest over forward + backward. Medians over "
        "interleaved rounds; x dense = median of same-round ratios (> 1: faster); spread = (max - min) / "
        "median.\n",
        "| model | batch | sparsity | variant | median ms | x dense | spread |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        for v, t in r["median_s"].items():
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['sparsity']} | {v} | {1e3 * t:.1f} | "
                f"{r['vs_dense'][v]:.2f} | {100 * r['spread'][v]:.0f}% |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=None, help="image side (default: the model's, 224)")
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.9])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-ms", type=float, default=200.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current)")
    ap.add_argument("--out", default=None, help="directory for model_train_<model>.md / .json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    env = environment()
    rows = []
    for sp in args.sparsity:
        rows.append(run(args.model, args.batch, args.image, sp, args.rounds, args.batch_ms / 1e3, rng))
        print(markdown(rows[-1:], env).split("|---|---:|---:|---|---:|---:|---:|\n")[1], flush=True)
    md = markdown(rows, env)
    if args.out:
        write_table(args.out, f"model_train_{args.model}", md, {"environment": env, "rows": rows})
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
