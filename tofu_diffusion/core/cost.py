"""A FLOP model of whether reducing a block pays: saved work against the matching's cost."""

from __future__ import annotations

from typing import Optional

# Per-token FLOPs of a transformer block's linear layers, in units of C^2 multiply-adds: q, k, v, out
# (4) for self-attention, q and out (2) for cross-attention, a 4x GEGLU/GELU feed-forward (~12).
_LINEAR_PER_TOKEN = {"self_attention": 4, "cross_attention": 2, "feed_forward": 12}


def block_flops(tokens: int, channels: int, sublayers: tuple[str, ...], key_tokens: Optional[int] = None) -> int:
    """Multiply-adds of one block's ``sublayers`` on ``tokens`` tokens of width ``channels`` (per image).

    ``key_tokens``: the keys and values its self-attention sees (ToDo downsamples them; default ``tokens``).
    Cross-attention's context and joint attention's text tokens are not counted: they do not change with
    the image tokens' reduction, so a share of saved work computed from this is of the image tokens' work.
    """
    keys = tokens if key_tokens is None else key_tokens
    flops = tokens * channels * channels * sum(_LINEAR_PER_TOKEN[s] for s in sublayers)
    if "self_attention" in sublayers:
        flops += 2 * tokens * keys * channels
    return flops


def matching_flops(num_tokens: int, channels: int, num_dst: int) -> int:
    """Multiply-adds of scoring every source token against every destination."""
    return (num_tokens - num_dst) * num_dst * channels


def reduction_pays(num_tokens: int, channels: int, removed: int, num_dst: int, sublayers: tuple[str, ...]) -> bool:
    """True when removing ``removed`` of ``num_tokens`` tokens saves more multiply-adds than matching costs.

    Matching scores every source against every destination: (N - D) * D * C. Removing r tokens saves
    their rows in the reduced linear layers, and in self-attention r fewer queries and keys:
    (N^2 - (N - r)^2) * C for q k^T and as much again for the weighted sum of values.
    """
    n, c, r = num_tokens, channels, removed
    if r <= 0:
        return False
    saved = block_flops(n, c, sublayers) - block_flops(n - r, c, sublayers)
    return saved > matching_flops(n, c, num_dst)
