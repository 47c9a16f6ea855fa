"""MCTF's informativeness on a denoiser: the attention each token receives, estimated from a few queries.

The attention module is duck-typed (``to_q``, ``to_k``, ``heads``, optional ``norm_q`` / ``norm_k``: a
diffusers ``Attention``); nothing here imports diffusers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .destinations import Key
from .matching import attention_received, mean_over_queries
from .sampling import stratified_grid_queries


def estimate_attention_received(
    attention: torch.nn.Module,
    hidden: torch.Tensor,
    num_queries: int,
    grid: Sequence[int],
    generator: Optional[torch.Generator] = None,
    key: Optional[Key] = None,
) -> torch.Tensor:
    """Attention each token receives in ``attention`` (a diffusers ``Attention``): (B, N), estimated
    from ``num_queries`` queries stratified over the ``grid`` (one per cell, at a random position drawn
    from ``key`` or ``generator``), weighted by their cell's share: an unbiased estimate of the mean over
    all queries.

    Keys of all N tokens would cost a full N x C x C projection, which the reduced block never needs.
    For head h, ``q . (W_k x + b) = (W_k^T q) . x + q . b``, and the second term is the same for every
    key, so it cancels in the softmax: the few queries are projected back to the input space instead
    (heads x queries x C x C) and dotted with the raw inputs. Models with a key norm (qk-norm) break
    this identity and get their keys projected.
    """
    for name in ("to_q", "to_k", "heads"):
        if not hasattr(attention, name):
            raise TypeError(
                f"mctf needs a diffusers Attention with to_q/to_k/heads to estimate informativeness; "
                f"{type(attention).__name__} has no {name}. Use tau_info=0 to switch that criterion off."
            )
    with torch.no_grad():
        b, n, c = hidden.shape
        heads = attention.heads
        index, weight = stratified_grid_queries(grid, num_queries, generator, key=key)
        query = attention.to_q(hidden[:, index.to(hidden.device)])
        nq = query.shape[1]
        head_dim = query.shape[-1] // heads
        norm_q, norm_k = getattr(attention, "norm_q", None), getattr(attention, "norm_k", None)
        if norm_q is not None:
            query = _normed(norm_q, query, heads)
        # (H x Nq x C x N logits against N x C x C for the keys: cheaper while H x Nq < C.)
        if norm_k is None and isinstance(attention.to_k, torch.nn.Linear) and heads * nq < c:
            w_k = attention.to_k.weight.view(heads, head_dim, c)
            q = query.view(b, nq, heads, head_dim).float() * head_dim**-0.5
            q_in = torch.einsum("bqhd,hdc->bhqc", q, w_k.float()).reshape(b, -1, c)  # (B, H*Nq, C)
            logits = torch.bmm(q_in, hidden.float().transpose(1, 2))  # (B, H*Nq, N): one matmul
            return mean_over_queries(logits.softmax(dim=-1).view(b, heads, nq, n), weight)
        keys = attention.to_k(hidden)
        if norm_k is not None:
            keys = _normed(norm_k, keys, heads)
        return attention_received(query, keys, heads, query_weights=weight)


def _normed(norm: torch.nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    """A q/k norm applied as its attention applies it: per head (width head_dim), or across heads."""
    b, n, inner = x.shape
    shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
    width = shape[-1] if isinstance(shape, (tuple, list, torch.Size)) else shape
    if width == inner and inner != inner // heads:
        return norm(x)
    return norm(x.view(b, n, heads, inner // heads)).flatten(2)
