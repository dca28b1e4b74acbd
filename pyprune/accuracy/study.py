"""The accuracy study behind ``pyprune accuracy``: train a dense model on real data, then for every method and
level prune at matched FLOPs, fine-tune (optionally distil, optionally iteratively), run the prune -> low-rank
-> int8 pipeline on the best structured result, and time everything in one interleaved run."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..compare.report import environment
from ..flops import count_flops, count_params
from .data import digits
from .lowrank import lowrank
from .models import MODELS, build_model
from .pipeline import (
    METHODS,
    STRUCTURED,
    FineTune,
    NotApplicable,
    Prune,
    apply_prune,
    check_time_batch,
    effective_flops,
    finalize,
    measure_latency,
)
from .quant import quantize_int8
from .report import AccuracyReport
from .train import evaluate, train

DEFAULT_METHODS = METHODS
QUICK_METHODS = ("l1", "taylor", "thinet", "magnitude", "2:4")
# dense epochs, fine-tune epochs, image side; the ResNet runs on 16x16 digits to fit a 2-core CPU
SETTINGS = {"lenet5": (20, 5, 32), "resnet18-small": (8, 3, 16)}
QUICK_SETTINGS = {"lenet5": (8, 2, 32), "resnet18-small": (3, 1, 16)}


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, flush=True)


def _sizes(model: nn.Module, one: tuple) -> dict:
    return {
        "params": count_params(model),
        "flops": count_flops(model, one),
        "nnz_flops": effective_flops(model, one),
    }


def accuracy_study(
    model: str = "lenet5",
    methods: Sequence[str] | None = None,
    levels: Sequence[float] = (0.5, 0.75),
    epochs: int | None = None,
    finetune_epochs: int | None = None,
    distill: bool = False,
    iterative: int = 1,
    run_pipeline: bool = True,
    quick: bool = False,
    threads: int = 1,
    time_batch: int = 64,
    budget_s: float | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> AccuracyReport:
    """Run the study on the digits task; returns an :class:`AccuracyReport` (table, JSON, CSV, Pareto plot).

    ``levels``: fractions of the dense model's FLOPs removed (structured, matched by channel-ratio search) or
    of the weights zeroed (unstructured; 2:4 runs at 0.5 only). ``quick``: fewer epochs and methods.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    methods = tuple(methods if methods is not None else (QUICK_METHODS if quick else DEFAULT_METHODS))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods: unknown {bad}; valid methods are {list(METHODS)}")
    levels = tuple(float(x) for x in levels)
    for lv in levels:
        if not 0.0 < lv < 1.0:
            raise ValueError(
                f"levels must be in (0, 1) (fraction of FLOPs removed; 1 removes every channel), got {lv}"
            )
    if isinstance(iterative, bool) or not isinstance(iterative, int) or iterative < 1:
        raise ValueError(f"iterative must be an int >= 1 (pruning steps), got {iterative!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    check_time_batch(time_batch)
    d_ep, f_ep, size = (QUICK_SETTINGS if quick else SETTINGS)[model]
    epochs = d_ep if epochs is None else epochs
    finetune_epochs = f_ep if finetune_epochs is None else finetune_epochs
    budget_s = (8.0 if quick else 30.0) if budget_s is None else budget_s
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # training too: results then do not depend on the machine's core count
    try:
        task = digits(size=size, seed=seed)
        xs = torch.cat([x for x, _ in task.val])[:time_batch]
        args, one = (xs,), (xs[:1],)
        torch.manual_seed(seed)
        dense = build_model(model, num_classes=task.num_classes, in_channels=task.input_shape[0])
        _log(f"training dense {model} on {task.name} for {epochs} epochs", verbose)
        t0 = time.perf_counter()
        losses = train(dense, task.train, epochs, lr=2e-3, description=f"dense {model}")
        dense.eval()
        dense_acc = evaluate(dense, task.val)
        trained = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "untrained"  # epochs=0
        _log(f"dense: val accuracy {dense_acc:.2%} ({trained}, {time.perf_counter() - t0:.1f} s)", verbose)
        dense_sizes = _sizes(dense, one)
        rows = [
            {
                "method": "dense",
                "level": None,
                "kind": "dense",
                **dense_sizes,
                "flops_removed": 0.0,
                "acc_before": dense_acc,
                "acc_after": dense_acc,
                "note": f"{epochs} epochs",
            }
        ]
        timed: dict[str, nn.Module] = {"dense": dense}
        ft = FineTune(finetune_epochs, distill=distill)
        between = FineTune(max(1, finetune_epochs // iterative), distill=distill) if iterative > 1 else None
        for lv in levels:
            for m in methods:
                if m == "2:4" and abs(lv - 0.5) > 1e-9:
                    continue  # 2:4 is 50% by definition
                kind = "structured" if m in STRUCTURED else "unstructured"
                key = f"{m}@{lv:g}"
                t0 = time.perf_counter()
                torch.manual_seed(seed)
                try:
                    p = Prune(m, lv, steps=iterative, between=between)
                    pruned, note = apply_prune(
                        dense, p, one, task.train, teacher=dense, dense_flops=dense_sizes["flops"]
                    )
                except NotApplicable as exc:
                    rows.append({"method": m, "level": lv, "kind": kind, "note": f"n/a: {exc}"})
                    _log(f"{key}: n/a ({exc})", verbose)
                    continue
                before = evaluate(finalize(pruned, m, p.block)[0], task.val)
                torch.manual_seed(seed)
                tuned = copy.deepcopy(pruned)
                train(
                    tuned,
                    task.train,
                    ft.epochs,
                    lr=ft.lr,
                    teacher=dense if distill else None,
                    alpha=ft.alpha,
                    temperature=ft.temperature,
                    description=f"fine-tune {key}",
                )
                deploy, fnote = finalize(tuned, m, p.block)
                after = evaluate(deploy, task.val)
                sizes = _sizes(deploy, one)
                rows.append(
                    {
                        "method": m,
                        "level": lv,
                        "kind": kind,
                        **sizes,
                        "flops_removed": 1 - sizes["nnz_flops"] / dense_sizes["nnz_flops"],
                        "acc_before": before,
                        "acc_after": after,
                        "note": "; ".join(x for x in (note, fnote) if x),
                    }
                )
                timed[key] = deploy
                _log(
                    f"{key}: acc {before:.2%} -> {after:.2%} after {ft.epochs} epochs, FLOPs removed "
                    f"{rows[-1]['flops_removed']:.1%} ({time.perf_counter() - t0:.1f} s)",
                    verbose,
                )
        if run_pipeline:
            rows += _pipeline_rows(
                rows,
                timed,
                dense,
                task,
                args,
                one,
                dense_sizes,
                finetune_epochs,
                distill,
                threads,
                seed,
                verbose,
            )
        _log(
            f"timing {len(timed)} models, batch {time_batch}, {threads} thread(s), ~{budget_s:.0f} s", verbose
        )
        lat = measure_latency(timed, args, "dense", threads, budget_s=budget_s, seed=seed)
        for r in rows:
            k = r.get("_key", r["method"] if r["level"] is None else f"{r['method']}@{r['level']:g}")
            if k in lat and "acc_after" in r:
                r.update(
                    {f: lat[k][f] for f in ("median_s", "p10_s", "p90_s", "noisy", "speedup", "times_s")}
                )
            r.pop("_key", None)
    finally:
        torch.set_num_threads(old_threads)
    settings = {
        "model": model,
        "task": task.name,
        "train_samples": len(task.train.y),
        "val_samples": len(task.val.y),
        "dense_epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "distill": distill,
        "iterative": iterative,
        "levels": list(levels),
        "methods": list(methods),
        "time_batch": time_batch,
        "quick": quick,
        "seed": seed,
        "wall_s": time.perf_counter() - t_start,
    }
    return AccuracyReport(rows=rows, environment=environment(threads, "cpu"), settings=settings)


def _pipeline_rows(
    rows, timed, dense, task, args, one, dense_sizes, finetune_epochs, distill, threads, seed, verbose
) -> list[dict]:
    """dense -> int8, and best structured -> lowrank -> fine-tune -> int8 (the seed's pipeline)."""
    out = []
    q, qnote = quantize_int8(dense, task.train, args)
    timed["dense+int8"] = q
    out.append(
        {
            "method": "dense+int8",
            "level": None,
            "kind": "pipeline",
            **dense_sizes,
            "flops_removed": 0.0,
            "acc_before": rows[0]["acc_after"],
            "acc_after": evaluate(q, task.val),
            "note": qnote + "; params/FLOPs of the float model",
            "_key": "dense+int8",
        }
    )
    structured = [r for r in rows if r["kind"] == "structured" and "acc_after" in r]
    if not structured:
        return out
    first_level = structured[0]["level"]
    best = max((r for r in structured if r["level"] == first_level), key=lambda r: r["acc_after"])
    key = f"{best['method']}@{best['level']:g}"
    base = timed[key]
    t0 = time.perf_counter()
    lr_model, rep = lowrank(base, args, energy=0.9, method="tucker", threads=threads, seed=seed)
    before = evaluate(lr_model, task.val)
    torch.manual_seed(seed)
    train(
        lr_model,
        task.train,
        max(1, finetune_epochs // 2),
        lr=5e-4,
        teacher=dense if distill else None,
        description=f"fine-tune {key}+lowrank",
    )
    after = evaluate(lr_model, task.val)
    sizes = _sizes(lr_model, one)
    timed[key + "+lowrank"] = lr_model
    out.append(
        {
            "method": f"{best['method']}+lowrank",
            "level": best["level"],
            "kind": "pipeline",
            **sizes,
            "flops_removed": 1 - sizes["nnz_flops"] / dense_sizes["nnz_flops"],
            "acc_before": before,
            "acc_after": after,
            "note": f"Tucker-2/SVD energy 0.9: {rep.summary()}",
            "_key": key + "+lowrank",
        }
    )
    q, qnote = quantize_int8(lr_model, task.train, args)
    timed[key + "+lowrank+int8"] = q
    out.append(
        {
            "method": f"{best['method']}+lowrank+int8",
            "level": best["level"],
            "kind": "pipeline",
            **sizes,
            "flops_removed": out[-1]["flops_removed"],
            "acc_before": after,
            "acc_after": evaluate(q, task.val),
            "note": qnote + "; params/FLOPs of the float model",
            "_key": key + "+lowrank+int8",
        }
    )
    _log(
        f"pipeline {key} -> lowrank -> int8: acc {best['acc_after']:.2%} -> {after:.2%} -> "
        f"{out[-1]['acc_after']:.2%} ({time.perf_counter() - t0:.1f} s)",
        verbose,
    )
    return out


__all__ = ["DEFAULT_METHODS", "QUICK_METHODS", "accuracy_study"]
