"""Pure tensor token-reduction algorithms (imports only torch)."""

from .cost import block_flops, matching_flops, reduction_pays
from .destinations import DESTINATIONS, alternating_partition, grid_partition, hashed, max_grid_ratio, mix_key
from .grid import Grid, cells, downsampled_size, expand_stride, grid_text, num_tokens, ravel, resize_tokens
from .informativeness import estimate_attention_received
from .linearity import interpolation_gap, switch_depth_from_gaps
from .matching import (
    TOKEN_ORDERS,
    attention_received,
    best_similarity,
    bidirectional_matching,
    bipartite_soft_matching,
    count_above,
    mctf_scores,
    mean_over_queries,
    threshold_granularity,
)
from .plan import (
    MERGE_MODES,
    MergePlan,
    apply_fused_attention,
    concat_plans,
    fuse_attention,
    identity_plan,
    mlerp,
    plan_from_pairs,
)
from .sampling import query_cells, stratified_grid_queries
from .schedule import layer_schedule, requested_r

__all__ = [
    "DESTINATIONS",
    "MERGE_MODES",
    "TOKEN_ORDERS",
    "alternating_partition",
    "apply_fused_attention",
    "attention_received",
    "best_similarity",
    "bidirectional_matching",
    "bipartite_soft_matching",
    "block_flops",
    "cells",
    "concat_plans",
    "count_above",
    "downsampled_size",
    "estimate_attention_received",
    "expand_stride",
    "fuse_attention",
    "Grid",
    "grid_partition",
    "grid_text",
    "hashed",
    "identity_plan",
    "interpolation_gap",
    "layer_schedule",
    "matching_flops",
    "max_grid_ratio",
    "mctf_scores",
    "mean_over_queries",
    "MergePlan",
    "mix_key",
    "mlerp",
    "num_tokens",
    "plan_from_pairs",
    "query_cells",
    "ravel",
    "reduction_pays",
    "requested_r",
    "resize_tokens",
    "stratified_grid_queries",
    "switch_depth_from_gaps",
    "threshold_granularity",
]
