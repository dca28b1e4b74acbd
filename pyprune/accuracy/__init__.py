"""Accuracy vs measured speedup: prune -> fine-tune (-> distill) -> low-rank -> int8 on real, offline data.

``pyprune.pipeline(model, train_data, val_data, stages=[...])`` runs the stages on any classifier and loaders
of (x, y) batches; ``accuracy_study`` (``pyprune accuracy``) runs every method on the digits task.
"""

from .data import Batches, Task, check_loader, digits
from .lowrank import LowRankReport, cp_conv, energy_rank, lowrank, svd_linear, tucker2_conv
from .models import MODELS, SmallResNet, build_model
from .pipeline import (
    METHODS,
    STRUCTURED,
    UNSTRUCTURED,
    FineTune,
    Int8,
    LowRank,
    NotApplicable,
    PipelineResult,
    Prune,
    effective_flops,
    measure_latency,
    parse_stages,
    pipeline,
)
from .quant import quantize_int8
from .report import AccuracyReport
from .study import accuracy_study
from .train import distillation_loss, evaluate, train

__all__ = [
    "METHODS",
    "MODELS",
    "STRUCTURED",
    "UNSTRUCTURED",
    "AccuracyReport",
    "Batches",
    "FineTune",
    "Int8",
    "LowRank",
    "LowRankReport",
    "NotApplicable",
    "PipelineResult",
    "Prune",
    "SmallResNet",
    "Task",
    "accuracy_study",
    "build_model",
    "check_loader",
    "cp_conv",
    "digits",
    "distillation_loss",
    "effective_flops",
    "energy_rank",
    "evaluate",
    "lowrank",
    "measure_latency",
    "parse_stages",
    "pipeline",
    "quantize_int8",
    "svd_linear",
    "train",
    "tucker2_conv",
]
