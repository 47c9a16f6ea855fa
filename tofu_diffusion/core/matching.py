"""Matching: decide which tokens merge into which, producing a :class:`MergePlan`.

* :func:`bipartite_soft_matching` - ToMe: every source takes its most cosine-similar destination,
  the ``r`` best-matched sources merge.
* :func:`mctf_scores` + :func:`bidirectional_matching` - MCTF: a multi-criteria score (similarity,
  informativeness, size), ``r // 2`` sources merge A->B, then the rest B->A into A tokens that are
  still unmerged, reusing the same score matrix.
* :func:`attention_received` - the informativeness input: attention each key receives.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .plan import MergePlan, plan_from_pairs

# Order of a plan's output slots (the tokens the next layer sees):
# "score":    unmerged sources by decreasing match score, then destinations (tomesd);
# "sets":     protected tokens, then unmerged sources, then destinations, each set in the order its
#             reference keeps it (ToMe's ViT patch: sources by index; MCTF: see bidirectional_matching);
# "original": every kept token at its original relative position.
TOKEN_ORDERS = ("score", "sets", "original")


def _cosine_scores(metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(B, Na, Nb) cosine similarity between source and destination tokens."""
    # A block input is often a transposed view (a UNet's 1x1 conv projection, permuted): normalising the view
    # costs ~10x copying it contiguous and normalising the copy (a few hundred tokens, CPU).
    metric = F.normalize(metric.contiguous(), dim=-1)
    return metric[:, src] @ metric[:, dst].transpose(1, 2)


def best_similarity(metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(B, Na): each source's cosine similarity to its most similar destination."""
    with torch.no_grad():
        return _cosine_scores(metric, src, dst).max(dim=-1).values


def threshold_granularity(num_tokens: int) -> int:
    """What adaptive counts are rounded down to: 8, or about N / 64 (a power of two) on larger grids, so a
    block sees at most ~64 distinct token counts (each one a torch.compile specialisation)."""
    return max(8, 1 << max(0, (num_tokens // 64).bit_length() - 1))


def count_above(best: torch.Tensor, threshold: float, cap: int, granularity: int) -> int:
    """How many sources a batch merges under a similarity ``threshold``: its sample with the fewest sources
    above it sets the count (one shape for the batch), rounded down to ``granularity``, at most ``cap``.
    This is adaptive reduction's one host sync."""
    smallest = int((best > threshold).sum(dim=-1).min())
    return min(cap, smallest // granularity * granularity)


def _protect(scores: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
             protected: Optional[torch.Tensor]) -> torch.Tensor:
    """Protected tokens (CLS, distillation) neither leave nor receive: their rows/columns become -inf."""
    if protected is None:
        return scores
    # masked_fill rather than boolean indexing: no data-dependent shape, so no host sync (and meta works)
    scores = scores.masked_fill(protected[src].view(1, -1, 1), -math.inf)
    return scores.masked_fill(protected[dst].view(1, 1, -1), -math.inf)


def _check_order(order: str, allowed: tuple = TOKEN_ORDERS) -> None:
    if order not in allowed:
        raise ValueError(f"unknown token order {order!r}; choose one of {allowed}")


def _protected_first(kept: torch.Tensor, protected: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Move the protected tokens of ``kept`` (B, K) to the front, in index order (CLS, then distillation);
    the others keep their relative order."""
    if protected is None:
        return kept  # (with no protected token the keys below increase: the order is kept as it is)
    position = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    key = torch.where(protected[kept], kept, num_tokens + position)
    return kept.gather(1, key.argsort(dim=1))


def bipartite_soft_matching(
    metric: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    r: int,
    protected: Optional[torch.Tensor] = None,
    order: str = "score",
    weights: Optional[torch.Tensor] = None,
    protected_sources: Optional[int] = None,
    threshold: Optional[float] = None,
) -> Optional[MergePlan]:
    """ToMe's bipartite soft matching of ``metric`` (B, N, C) between sources ``src`` and destinations ``dst``.

    ``r`` is capped by the number of sources. Returns None when nothing is merged. ``order`` is the slot
    order (``TOKEN_ORDERS``): ``"score"`` is tomesd's, ``"sets"`` ToMe's ViT patch (protected tokens,
    unmerged sources by index, destinations), ``"original"`` the tokens' own order.
    ``protected`` is a (N,) bool mask of tokens that must not be merged; ``protected_sources``, how many of
    them are sources when the caller knows it (no count from the device: works on the meta device).
    ``threshold``: merge only sources whose best cosine similarity is above it, ``r`` then a cap
    (``count_above``: the batch's smallest count, rounded down).
    """
    _check_order(order)
    b, n, _ = metric.shape
    if protected is not None:
        if protected_sources is None:
            protected_sources = int(protected[src].sum())
        r = min(r, src.numel() - protected_sources)
    r = min(r, src.numel())
    if r <= 0:
        return None
    with torch.no_grad():
        scores = _protect(_cosine_scores(metric, src, dst), src, dst, protected)
        node_max, node_idx = scores.max(dim=-1)
        if threshold is not None:
            r = count_above(node_max, threshold, r, threshold_granularity(n))
            if r <= 0:
                return None
        edge_idx = node_max.argsort(dim=-1, descending=True)
        merged = edge_idx[:, :r]
        unmerged = edge_idx[:, r:]
        dst_choice = torch.gather(node_idx, 1, merged)
        src_tokens = src[merged]
        if order == "original":
            return plan_from_pairs(n, src_tokens, dst[dst_choice], weights)
        if order == "sets":
            kept = torch.cat([src[unmerged].sort(dim=1).values, dst.expand(b, -1)], dim=1)
            return plan_from_pairs(n, src_tokens, dst[dst_choice], weights, _protected_first(kept, protected, n))
        num_unmerged = unmerged.shape[1]
        kept_idx = torch.cat([src[unmerged], dst.expand(b, -1)], dim=1)
        return MergePlan(kept_idx, src_tokens, num_unmerged + dst_choice, n, weights)


def mctf_scores(
    metric: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    attention: Optional[torch.Tensor] = None,
    sizes: Optional[torch.Tensor] = None,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    protected: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MCTF's multi-criteria score W (B, Na, Nb) = W_sim * W_info * W_size.

    * ``W_sim = ((1 + cos) / 2) ** (1 / tau_sim)``
    * ``W_info = (a~_i a~_j) ** (1 / tau_info)`` with ``a~_i = min_k a_k / a_i`` (``attention`` (B, N)
      is the attention each token receives): uninformative tokens score high, so they merge first.
    * ``W_size = (s~_i s~_j) ** (1 / tau_size)`` with ``s~_i = min_k s_k / s_i``: small tokens merge first.

    A criterion is off (factor 1) when its tau is 0 or its input is None.
    """
    with torch.no_grad():
        b = metric.shape[0]
        if tau_sim > 0:
            scores = _cosine_scores(metric.float(), src, dst)
            scores = scores.add_(1.0).mul_(0.5).clamp_(min=0.0)
            if tau_sim != 1:
                scores = scores.pow_(1.0 / tau_sim)
        else:
            scores = torch.ones(b, src.numel(), dst.numel(), device=metric.device)
        # (x~_i x~_j) ** (1/tau) = x~_i ** (1/tau) * x~_j ** (1/tau): both criteria are per-token factors,
        # so the dense matrix only sees two broadcast multiplies.
        factor = None
        for values, tau in ((attention, tau_info), (sizes, tau_size)):
            if values is None or tau <= 0:
                continue
            values = values.float().clamp_min(torch.finfo(torch.float32).tiny)
            term = (values.amin(dim=1, keepdim=True) / values) ** (1.0 / tau)
            factor = term if factor is None else factor * term
        if factor is not None:
            scores.mul_(factor[:, src].unsqueeze(2)).mul_(factor[:, dst].unsqueeze(1))
        return _protect(scores, src, dst, protected)


def bidirectional_matching(
    scores: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    num_tokens: int,
    r: int,
    weights: Optional[torch.Tensor] = None,
    protected_rows: Union[bool, int] = False,
    order: str = "original",
    protected: Optional[torch.Tensor] = None,
) -> Optional[MergePlan]:
    """MCTF's bidirectional matching on a score matrix (B, Na, Nb).

    ``r // 2`` A tokens merge into their best B token; then ``r - r // 2`` B tokens (capped by |B|)
    merge into their best A token among those not merged in the first step. A chain A->B->A resolves
    to the final A token. Set ``protected_rows`` when some rows of ``scores`` are all -inf (protected
    tokens), so that ``r`` is capped below them: their number when the caller knows it (no host sync, and
    it works on the meta device), or True to count them. ``order``: ``"original"`` keeps the kept tokens in their
    original order; ``"sets"`` is MCTF's reference order: the A tokens left after the first step (by
    index), then the B tokens left after the second, by decreasing second-step score (``protected``, a
    (N,) bool mask, moves protected tokens to the front).
    """
    _check_order(order, ("sets", "original"))
    num_a, num_b = scores.shape[1], scores.shape[2]
    r_ba = min(r - r // 2, num_b)
    r_ab = min(r - r_ba, num_a - (1 if r_ba > 0 else 0))
    b = scores.shape[0]
    with torch.no_grad():
        best_b, best_b_idx = scores.max(dim=2)  # A -> B
        if protected_rows is True:
            # Never merge more A tokens than have a finite score (protected ones have none).
            r_ab = min(r_ab, int(torch.isfinite(best_b).sum(dim=1).min()))
        elif protected_rows:
            r_ab = min(r_ab, num_a - int(protected_rows))
        if r_ab + r_ba <= 0:
            return None
        order_a = best_b.argsort(dim=1, descending=True)
        a_merged = order_a[:, :r_ab]
        a_target = torch.gather(best_b_idx, 1, a_merged)  # index into B

        # B -> A over the same scores, A tokens already merged are no longer targets. Masking rows and
        # reducing over dim 1 keeps the reduction on contiguous memory (no transposed copy).
        taken = torch.zeros(b, num_a, 1, dtype=torch.bool, device=scores.device)
        taken.scatter_(1, a_merged.unsqueeze(-1), True)
        best_a, best_a_idx = scores.masked_fill(taken, -math.inf).max(dim=1)
        order_b = best_a.argsort(dim=1, descending=True)
        b_merged = order_b[:, :r_ba]
        b_target = torch.gather(best_a_idx, 1, b_merged)  # index into A

        # Resolve A->B->A chains: a B target that itself merged forwards to its own A target.
        b_final = dst.expand(b, -1).clone()  # final token of every B token
        b_final.scatter_(1, b_merged, src[b_target])
        src_tokens = torch.cat([src[a_merged], dst[b_merged]], dim=1)
        dst_tokens = torch.cat([torch.gather(b_final, 1, a_target), src[b_target]], dim=1)
        kept = None
        if order == "sets":
            a_left = order_a[:, r_ab:].sort(dim=1).values
            kept = torch.cat([src[a_left], dst[order_b[:, r_ba:]]], dim=1)
            kept = _protected_first(kept, protected, num_tokens)
        return plan_from_pairs(num_tokens, src_tokens, dst_tokens, weights, kept)


def attention_received(
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
    key_bias: Optional[torch.Tensor] = None,
    query_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention each key token receives, averaged over heads and queries: (B, Nq, C), (B, Nk, C) -> (B, Nk).

    ``key_bias`` (B, Nk), e.g. ``log(size)``, is added to the logits (proportional attention).
    ``query_weights`` (Nq,), summing to 1, weigh the queries (a stratified sample of them, see
    :func:`stratified_grid_queries`); None is the plain mean.
    """
    b, nq, c = query.shape
    head_dim = c // num_heads
    # Scale the (few) queries rather than the (Nq x Nk) logits.
    q = query.reshape(b, nq, num_heads, head_dim).transpose(1, 2).float() * head_dim**-0.5
    k = key.reshape(b, key.shape[1], num_heads, head_dim).transpose(1, 2).float()
    logits = q @ k.transpose(-1, -2)
    if key_bias is not None:
        logits = logits + key_bias.float()[:, None, None, :]
    return mean_over_queries(logits.softmax(dim=-1), query_weights)


def mean_over_queries(probs: torch.Tensor, query_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, H, Nq, Nk) attention probabilities -> (B, Nk): mean over heads, (weighted) mean over queries."""
    if query_weights is None:
        return probs.mean(dim=(1, 2))
    w = query_weights.to(device=probs.device, dtype=probs.dtype)
    return torch.einsum("bhqk,q->bk", probs, w) / probs.shape[1]
