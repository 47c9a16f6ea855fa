"""A merge plan: which tokens go where, computed once and applied by ``merge`` and ``unmerge``.

The plan is the single representation every matcher produces. For a batch of ``N`` tokens it holds

* ``kept_idx``  (B, K): for each output slot, the original index of the token that represents it;
* ``src_idx``   (B, r): the original indices of the tokens merged away;
* ``src_slot``  (B, r): the output slot each merged-away token joins.

``merge`` gathers the kept tokens and folds the merged-away ones into their slots; ``unmerge`` is a
single gather that copies every slot's value back to all the original tokens it stands for.
"""

from __future__ import annotations

from typing import Optional

import torch

MERGE_MODES = ("mean", "size_weighted", "mlerp", "prune")

# MLERP divides by the norm of the mean; tokens that cancel out must not blow up.
_NORM_EPS = 1e-6


def _flatten_index(index: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, M) per-item token indices -> (B*M,) rows of the (B*stride, C) flattened batch."""
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * stride
    return (index + offsets).flatten()


def _select(x: torch.Tensor, flat_index: torch.Tensor, batch: int) -> torch.Tensor:
    """Rows of x (B, N, C) at flattened indices -> (B, M, C). index_select on the flattened batch is
    several times faster than gather with an expanded (B, M, C) index on CPU."""
    c = x.shape[-1]
    return x.reshape(-1, c).index_select(0, flat_index).view(batch, -1, c)


class MergePlan:
    """Token assignment shared by every merge/unmerge pair of one block (or one ViT layer)."""

    def __init__(
        self,
        kept_idx: torch.Tensor,
        src_idx: torch.Tensor,
        src_slot: torch.Tensor,
        num_tokens: int,
        weights: Optional[torch.Tensor] = None,
    ):
        self.kept_idx = kept_idx
        self.src_idx = src_idx
        self.src_slot = src_slot
        self.num_tokens = num_tokens
        # Per-token fusion weights (B, N) for ``size_weighted``/``mlerp``; None means all ones.
        self.weights = weights
        self._assign: Optional[torch.Tensor] = None
        self._group_count: Optional[torch.Tensor] = None
        # Flattened (batch * token) indices, built once and shared by every merge/unmerge of the plan.
        self._flat: dict[str, torch.Tensor] = {}

    def _flat_index(self, name: str) -> torch.Tensor:
        if name not in self._flat:
            index, stride = {
                "kept": (self.kept_idx, self.num_tokens),
                "src": (self.src_idx, self.num_tokens),
                "slot": (self.src_slot, self.num_kept),
                "assign": (self.assignment, self.num_kept),
            }[name]
            self._flat[name] = _flatten_index(index, stride)
        return self._flat[name]

    def repeat(self, times: int) -> "MergePlan":
        """The plan for a batch of ``times`` copies of this one's items, one after another."""
        weights = None if self.weights is None else self.weights.repeat(times, 1)
        return MergePlan(self.kept_idx.repeat(times, 1), self.src_idx.repeat(times, 1),
                         self.src_slot.repeat(times, 1), self.num_tokens, weights)

    def within(self, start: int, total: int) -> "MergePlan":
        """This plan applied to tokens ``start .. start + N`` of a sequence of ``total``: every other token is kept
        whole, in place (text before the image, a reference image after it). Merging gives
        ``[before; merged; after]``; a per-token argument over the whole sequence follows with ``take``."""
        after = total - start - self.num_tokens
        if start < 0 or after < 0:
            raise ValueError(f"a plan over {self.num_tokens} tokens does not fit at {start} in a sequence of {total}")
        if start == 0 and after == 0:
            return self
        b, device = self.batch_size, self.kept_idx.device
        head = torch.arange(start, device=device).expand(b, start)
        tail = torch.arange(start + self.num_tokens, total, device=device).expand(b, after)
        weights = None
        if self.weights is not None:
            weights = torch.ones(b, total, dtype=self.weights.dtype, device=self.weights.device)
            weights[:, start:start + self.num_tokens] = self.weights
        return MergePlan(torch.cat([head, self.kept_idx + start, tail], dim=1), self.src_idx + start,
                         self.src_slot + start, total, weights)

    # ------------------------------------------------------------------ shape facts
    @property
    def batch_size(self) -> int:
        return self.kept_idx.shape[0]

    @property
    def num_kept(self) -> int:
        return self.kept_idx.shape[1]

    @property
    def num_merged(self) -> int:
        return self.src_idx.shape[1]

    @property
    def assignment(self) -> torch.Tensor:
        """(B, N): the output slot of every original token."""
        if self._assign is None:
            b, k = self.kept_idx.shape
            assign = torch.empty(b, self.num_tokens, dtype=torch.long, device=self.kept_idx.device)
            slots = torch.arange(k, device=assign.device).expand(b, k)
            assign.scatter_(1, self.kept_idx, slots)
            assign.scatter_(1, self.src_idx, self.src_slot)
            self._assign = assign
        return self._assign

    @property
    def group_count(self) -> torch.Tensor:
        """(B, K): how many original tokens each slot stands for."""
        if self._group_count is None:
            b, k = self.kept_idx.shape
            ones = torch.ones(b, self.num_merged, device=self.kept_idx.device)
            self._group_count = torch.ones(b, k, device=self.kept_idx.device).scatter_add_(1, self.src_slot, ones)
        return self._group_count

    def take(self, table: torch.Tensor, batched: bool = True) -> torch.Tensor:
        """A per-token argument at the kept tokens, (B, K, ...): each slot takes its kept token's row (a merged
        group its destination's), as a position or a token's own conditioning should.

        ``table``: (B or 1, N, ...) when ``batched``, else (N, ...) shared by the batch."""
        if not batched:
            return table[self.kept_idx.to(table.device)]
        kept = self.kept_idx.to(table.device)
        if table.shape[0] == 1:
            return table[0][kept]
        rows = torch.arange(table.shape[0], device=table.device).unsqueeze(1)
        return table[rows, kept]

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """(B, N, C) -> (B, K, C)."""
        self._check_input(x)
        b = self.batch_size
        if mode == "prune":
            return _select(x, self._flat_index("kept"), b)
        if mode == "mean":
            return self._mean(x)
        if mode == "size_weighted":
            return self._weighted_mean(x)
        if mode == "mlerp":
            return self._mlerp(x, self._weighted_mean(x))
        raise ValueError(f"unknown merge mode {mode!r}; choose one of {MERGE_MODES}")

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, K, C) -> (B, N, C): every original token takes its slot's value."""
        if y.shape[1] != self.num_kept:
            raise ValueError(f"unmerge expects {self.num_kept} tokens, got {y.shape[1]}")
        return _select(y, self._flat_index("assign"), self.batch_size)

    def unmerge_with_offsets(self, y: torch.Tensor, reference: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """(B, K, C) -> (B, N, C): every token takes its slot's value plus its own offset from its group in
        ``reference`` (B, N, C), an earlier unreduced value of the same tokens: ``unmerge(y) + reference -
        unmerge(merge(reference))``. Where the tokens changed little since, each keeps its own detail instead
        of its destination's copy; a token merged with none gets its slot's value exactly."""
        return self.unmerge(y) + self.offsets(reference, mode)

    def offsets(self, reference: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """(B, N, C): every token's offset from its group's merged value in ``reference``, what
        ``unmerge_with_offsets`` adds; a plan reused over steps computes it once."""
        return reference - self.unmerge(self.merge(reference, mode))

    def merge_sizes(self, sizes: torch.Tensor) -> torch.Tensor:
        """Sizes travel with merged tokens: (B, N) -> (B, K), each slot the sum of its group."""
        kept = torch.gather(sizes, 1, self.kept_idx)
        return kept.scatter_add(1, self.src_slot, torch.gather(sizes, 1, self.src_idx))

    # ------------------------------------------------------------------ internals
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.num_tokens or x.shape[0] != self.batch_size:
            raise ValueError(
                f"this merge plan was computed for (batch={self.batch_size}, tokens={self.num_tokens}) "
                f"but got a tensor of shape {tuple(x.shape)}"
            )

    def group_sum(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, K, C): each slot's kept token plus the tokens merged into it."""
        b = self.batch_size
        total = _select(x, self._flat_index("kept"), b)  # a fresh tensor: safe to add into
        merged = _select(x, self._flat_index("src"), b)
        total.view(-1, x.shape[-1]).index_add_(0, self._flat_index("slot"), merged.view(-1, x.shape[-1]))
        return total

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        """Plain mean of each group, the destination included (tomesd's scatter_reduce('mean'))."""
        return self.group_sum(x).div_(self.group_count.to(x.dtype).unsqueeze(-1))

    def _weighted_mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return self._mean(x)
        total = self.group_sum(x * self.weights.to(x.dtype).unsqueeze(-1))
        return total.div_(self.merge_sizes(self.weights).to(x.dtype).unsqueeze(-1))

    def _mlerp(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """Rescale each merged mean to the largest norm in its group (norms in fp32 for half inputs)."""
        norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
        group_max = torch.gather(norms, 1, self.kept_idx).scatter_reduce(
            1, self.src_slot, torch.gather(norms, 1, self.src_idx), reduce="amax", include_self=True
        )
        mean_norm = torch.linalg.vector_norm(mean, dim=-1, dtype=torch.float32).clamp_min(_NORM_EPS)
        scale = group_max / mean_norm
        # Slots that stand for one token are returned untouched, not rescaled by ~1.
        scale = torch.where(self.group_count > 1, scale, torch.ones_like(scale))
        return mean * scale.to(mean.dtype).unsqueeze(-1)


def mlerp(tokens: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MLERP of a group of tokens (..., G, C) -> (..., C), the norm-preserving merge of ToFu.

    ``mean = sum_i w_i x_i / sum_i w_i``; ``out = mean / max(||mean||, eps) * max_i ||x_i||``.
    """
    if weights is None:
        mean = tokens.mean(dim=-2)
    else:
        w = weights.to(tokens.dtype).unsqueeze(-1)
        mean = (tokens * w).sum(dim=-2) / w.sum(dim=-2)
    target = torch.linalg.vector_norm(tokens, dim=-1, dtype=torch.float32).amax(dim=-1)
    scale = target / torch.linalg.vector_norm(mean, dim=-1, dtype=torch.float32).clamp_min(_NORM_EPS)
    return mean * scale.to(mean.dtype).unsqueeze(-1)


def identity_plan(batch: int, num_tokens: int, device: torch.device | str = "cpu") -> MergePlan:
    """The plan that keeps every one of ``num_tokens`` tokens: a segment ``concat_plans`` leaves unreduced."""
    empty = torch.empty(batch, 0, dtype=torch.long, device=device)
    kept = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
    return MergePlan(kept, empty, empty.clone(), num_tokens)


def concat_plans(plans: list[MergePlan]) -> MergePlan:
    """One plan over consecutive segments of a sequence, each reduced by its own plan (an edit pipeline's target
    image and each reference, every grid on its own): no token merges across segments. The output slots are the
    segments' slots in order, so ``merge`` gives ``[merged 1; merged 2; ...]``."""
    if not plans:
        raise ValueError("concat_plans needs at least one plan")
    if len({p.batch_size for p in plans}) != 1:
        raise ValueError(f"plans of different batch sizes: {[p.batch_size for p in plans]}")
    kept, src, slot, weights = [], [], [], []
    tokens = slots = 0
    for p in plans:
        kept.append(p.kept_idx + tokens)
        src.append(p.src_idx + tokens)
        slot.append(p.src_slot + slots)
        weights.append(p.weights)
        tokens, slots = tokens + p.num_tokens, slots + p.num_kept
    merged_weights = None
    if any(w is not None for w in weights):
        like = next(w for w in weights if w is not None)
        merged_weights = torch.cat([torch.ones(p.batch_size, p.num_tokens, dtype=like.dtype, device=like.device)
                                    if w is None else w for p, w in zip(plans, weights)], dim=1)
    return MergePlan(torch.cat(kept, dim=1), torch.cat(src, dim=1), torch.cat(slot, dim=1), tokens, merged_weights)


def plan_from_pairs(
    num_tokens: int,
    src_tokens: torch.Tensor,
    dst_tokens: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    kept_idx: Optional[torch.Tensor] = None,
) -> MergePlan:
    """Build a plan from (merged token -> kept token) pairs.

    ``dst_tokens`` must already be resolved to tokens that are themselves kept (no chains). ``kept_idx``
    (B, N - r) orders the output slots; None keeps the kept tokens in their original order (which keeps a
    leading CLS/distillation token where a classifier head reads it).
    """
    b, r = src_tokens.shape
    device = src_tokens.device
    k = num_tokens - r
    if kept_idx is None:
        merged = torch.zeros(b, num_tokens, dtype=torch.bool, device=device)
        merged.scatter_(1, src_tokens, True)
        # Sort key pushes merged tokens to the end while keeping kept tokens in index order.
        key = torch.arange(num_tokens, device=device).expand(b, -1) + merged.long() * num_tokens
        kept_idx = key.argsort(dim=1)[:, :k]
    slot_of = torch.empty(b, num_tokens, dtype=torch.long, device=device)
    slot_of.scatter_(1, kept_idx, torch.arange(k, device=device).expand(b, k))
    src_slot = torch.gather(slot_of, 1, dst_tokens)
    return MergePlan(kept_idx, src_tokens, src_slot, num_tokens, weights)


def fuse_attention(attention: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """MCTF's fused attention: (B, H, N, N) probabilities -> (B, H, K, K) over the merged tokens.

    Key columns of a group are summed (a merged key receives what its members received) and query
    rows are averaged with the plan's fusion weights (attention received times size), so every row
    still sums to 1 and the layer needs no second ``q k^T`` on the merged tokens.
    """
    b, h, n, _ = attention.shape
    # Keys: tokens along dim 1, every (head, query) pair a channel.
    columns = plan.group_sum(attention.permute(0, 3, 1, 2).reshape(b, n, h * n))  # (B, K, H*N)
    k = columns.shape[1]
    rows = columns.view(b, k, h, n).permute(0, 3, 2, 1).reshape(b, n, h * k)  # queries along dim 1
    fused = plan.merge(rows, "size_weighted")  # (B, K, H*K)
    return fused.view(b, k, h, k).transpose(1, 2)


def apply_fused_attention(attention: torch.Tensor, plan: MergePlan, value: torch.Tensor) -> torch.Tensor:
    """``fuse_attention(attention, plan) @ value`` without forming the fused matrix: (B, H, N, N)
    probabilities on the unmerged tokens and (B, H, K, D) values of the merged ones -> (B, H, K, D).

    The fused matrix is ``R A C``: ``C`` (N x K) sums each group's key columns, ``R`` (K x N) averages its
    query rows with the fusion weights. So ``R A C v = R (A (C v))``, where ``C v`` gives every original
    token its group's value (``unmerge``) and ``R`` is a weighted merge of the rows: one attention-sized
    product and two token-sized gathers, where forming ``R A C`` takes several passes over an N x N matrix.
    """
    b, h, k, d = value.shape
    n = plan.num_tokens
    expanded = plan.unmerge(value.transpose(1, 2).reshape(b, k, h * d)).view(b, n, h, d).transpose(1, 2)
    rows = (attention.to(value.dtype) @ expanded).transpose(1, 2).reshape(b, n, h * d)
    return plan.merge(rows, "size_weighted").view(b, k, h, d).transpose(1, 2)
