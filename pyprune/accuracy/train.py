"""Training, fine-tuning with optional knowledge distillation, and evaluation, with rich progress bars."""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.masks import get_mask


@contextlib.contextmanager
def progress(description: str, total: int, enabled: bool | None = None) -> Iterator[Callable[..., None]]:
    """A rich progress bar on a terminal; silent when stderr is not a TTY or ``enabled=False``.
    Yields ``advance(n=1, **fields)``."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n=1, **kw: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*cols, transient=True) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: object) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=n, info=info)

        yield advance


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Hinton et al. 2015: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The T^2 factor keeps the soft term's gradient scale independent of T. logits: (B, C), target: (B,).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (weight of the soft-label term), got {alpha!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, target)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def bn_l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |gamma| over BatchNorm layers (Network Slimming's sparsity term, Liu et al. 2017)."""
    terms = [
        m.weight.abs().sum()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def train(
    model: nn.Module,
    data: Iterable,
    epochs: int,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    teacher: nn.Module | None = None,
    alpha: float = 0.5,
    temperature: float = 4.0,
    bn_l1: float = 0.0,
    description: str = "train",
    show_progress: bool | None = None,
) -> list[float]:
    """Train ``model`` in place with Adam and a cosine learning-rate decay; returns the mean loss per epoch.

    With ``teacher``, the loss is :func:`distillation_loss` against the teacher's logits (soft and hard
    labels); ``bn_l1 > 0`` adds ``bn_l1 * sum |BN gamma|`` (network slimming). Weight masks set by
    ``pyprune.sparsify`` stay in place: the masked weights get no gradient through the mask.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if epochs == 0:
        return []
    params = _trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters (a quantized model cannot be fine-tuned)")
    n_steps = len(data) if hasattr(data, "__len__") else None
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    total = epochs * n_steps if n_steps else None
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)) if total else 1.0
    )
    if teacher is not None:
        teacher = teacher.eval()
    losses = []
    with progress(description, total or epochs) as advance:
        for ep in range(epochs):
            model.train()
            if hasattr(data, "set_epoch"):
                data.set_epoch(ep)
            tot, n = 0.0, 0
            for x, y in data:
                out = model(x)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                    loss = distillation_loss(out, t_out, y, alpha, temperature)
                else:
                    loss = F.cross_entropy(out, y)
                if bn_l1 > 0:
                    loss = loss + bn_l1 * bn_l1_penalty(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss.detach()) * x.shape[0]
                n += x.shape[0]
                if total:
                    advance(1, epoch=ep + 1, loss=float(loss.detach()))
            if n == 0:
                raise ValueError("train_data is empty: it must yield at least one (x, y) batch")
            losses.append(tot / n)
            if not total:
                advance(1, epoch=ep + 1, loss=losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` in eval mode over every (x, y) batch of ``data``."""
    was = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in data:
            correct += int((model(x).argmax(1) == y).sum())
            total += y.numel()
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("val_data is empty: it must yield at least one (x, y) batch")
    return correct / total


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (masks included: they are buffers of the parametrization)."""
    return copy.deepcopy(model)


def is_masked(model: nn.Module) -> bool:
    return any(get_mask(m) is not None for m in model.modules())
