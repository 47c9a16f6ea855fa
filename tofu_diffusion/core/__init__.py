"""Pure tensor token-reduction algorithms (imports only torch)."""

from .cost import block_flops, matching_flops, reduction_pays
from .destinations import DESTINATIONS, alternating_partition, grid_partition, hashed, max_grid_ratio, mix_key
from .matching import (
    TOKEN_ORDERS,
    attention_received,
    bidirectional_matching,
    bipartite_soft_matching,
    mctf_scores,
    mean_over_queries,
)
from .linearity import interpolation_gap, switch_depth_from_gaps
from .plan import MERGE_MODES, MergePlan, apply_fused_attention, fuse_attention, mlerp, plan_from_pairs
from .sampling import stratified_grid_queries
from .schedule import layer_schedule, requested_r

__all__ = [
    "DESTINATIONS",
    "MERGE_MODES",
    "MergePlan",
    "TOKEN_ORDERS",
    "alternating_partition",
    "apply_fused_attention",
    "attention_received",
    "bidirectional_matching",
    "bipartite_soft_matching",
    "block_flops",
    "fuse_attention",
    "grid_partition",
    "hashed",
    "interpolation_gap",
    "layer_schedule",
    "matching_flops",
    "max_grid_ratio",
    "mctf_scores",
    "mean_over_queries",
    "mix_key",
    "mlerp",
    "plan_from_pairs",
    "reduction_pays",
    "requested_r",
    "stratified_grid_queries",
    "switch_depth_from_gaps",
]
