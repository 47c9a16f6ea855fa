"""A FLOP model of whether reducing a block pays: saved work against the matching's cost."""

from __future__ import annotations

# Per-token FLOPs of a transformer block's linear layers, in units of C^2 multiply-adds: q, k, v, out
# (4) for self-attention, q and out (2) for cross-attention, a 4x GEGLU/GELU feed-forward (~12).
_LINEAR_PER_TOKEN = {"self_attention": 4, "cross_attention": 2, "feed_forward": 12}


def reduction_pays(num_tokens: int, channels: int, removed: int, num_dst: int, sublayers: tuple[str, ...]) -> bool:
    """True when removing ``removed`` of ``num_tokens`` tokens saves more multiply-adds than matching costs.

    Matching scores every source against every destination: (N - D) * D * C. Removing r tokens saves
    their rows in the reduced linear layers, and in self-attention r fewer queries and keys:
    (N^2 - (N - r)^2) * C for q k^T and as much again for the weighted sum of values.
    """
    n, c, r = num_tokens, channels, removed
    if r <= 0:
        return False
    saved = r * c * c * sum(_LINEAR_PER_TOKEN[s] for s in sublayers)
    if "self_attention" in sublayers:
        saved += 2 * (n * n - (n - r) ** 2) * c
    matching = (n - num_dst) * num_dst * c
    return saved > matching
