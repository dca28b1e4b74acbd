"""Pruning engine: dependency graph, importance criteria, channel and layer pruning, masks and conversion."""
from . import criteria
from .attention import PrunedMultiheadAttention
from .channel import IMPORTANCE, GroupPlan, PruningPlan, plan_pruning, prune_channels
from .graph import DependencyGraph, Group, Member, PruningError, UnsupportedPatternError, build_graph
from ..flops import count_flops, count_params

__all__ = [
    "IMPORTANCE", "DependencyGraph", "Group", "GroupPlan", "Member", "PrunedMultiheadAttention", "PruningError",
    "PruningPlan", "UnsupportedPatternError", "build_graph", "count_flops", "count_params", "criteria",
    "plan_pruning", "prune_channels",
]
