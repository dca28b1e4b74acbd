"""Pruning engine: dependency graph, importance criteria, channel and layer pruning, masks and conversion."""

from . import criteria
from ..flops import count_flops, count_params
from .attention import PrunedMultiheadAttention
from .channel import IMPORTANCE, GroupPlan, PruningPlan, plan_pruning, prune_channels
from .convert import ConvertReport, convert, to_pruned_convs
from .graph import DependencyGraph, Group, Member, PruningError, UnsupportedPatternError, build_graph
from .layers import Skip, prune_layers, residual_blocks
from .load import load_pruned_state_dict
from .masks import CubicSchedule, WeightMask, get_mask, mask_density, remove_masks, sparsify

__all__ = [
    "IMPORTANCE",
    "ConvertReport",
    "CubicSchedule",
    "DependencyGraph",
    "Group",
    "GroupPlan",
    "Member",
    "PrunedMultiheadAttention",
    "PruningError",
    "PruningPlan",
    "Skip",
    "UnsupportedPatternError",
    "WeightMask",
    "build_graph",
    "convert",
    "count_flops",
    "count_params",
    "criteria",
    "get_mask",
    "load_pruned_state_dict",
    "mask_density",
    "plan_pruning",
    "prune_channels",
    "prune_layers",
    "remove_masks",
    "residual_blocks",
    "sparsify",
    "to_pruned_convs",
]
