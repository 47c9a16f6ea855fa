"""How many tokens each layer of a classifier removes: ToMe's schedule forms, capped per layer."""

from __future__ import annotations

from typing import Optional, Sequence, Union

# An int (the same r in every layer), (r, inflection) (a linear ramp), or a per-layer list.
RSchedule = Union[int, tuple, Sequence[int]]


def requested_r(r: RSchedule, num_layers: int) -> list[int]:
    """The tokens each layer is asked to remove, before capping.

    * ``int``: ``r`` in every layer;
    * ``(r, inflection)`` with inflection in [-1, 1]: a linear ramp, about ``r * num_layers`` in total, as
      ToMe's ``parse_r``: the first layer takes ``r * (1 - inflection)`` truncated to an int ``lo``, the last
      ``2r - lo`` (so the total stays ``r`` per layer on average), and each layer the ramp's value
      truncated; inflection > 0 removes more late, < 0 more early, 0 is constant;
    * a list: one value per layer; a shorter list leaves the remaining layers unreduced.
    """
    if isinstance(r, bool):
        raise TypeError("r must be an int, an (r, inflection) tuple or a list of ints, not a bool")
    if isinstance(r, int):
        return [r] * num_layers
    if isinstance(r, tuple):
        base, inflection = r
        if num_layers == 1:
            return [int(base)]
        first = int(base * (1.0 - inflection))
        step = (2 * base - 2 * first) / (num_layers - 1)  # from `first` to its mirror 2r - first
        return [int(first + step * i) for i in range(num_layers)]
    values = [int(v) for v in r]
    if len(values) > num_layers:
        raise ValueError(f"r lists {len(values)} layers but the model has {num_layers}")
    return values + [0] * (num_layers - len(values))


def layer_schedule(
    num_tokens: int,
    num_layers: int,
    r: Optional[RSchedule] = None,
    ratio: float = 0.0,
    protected: int = 1,
    layers: Optional[Sequence[int]] = None,
    min_tokens: int = 0,
) -> list[int]:
    """Tokens removed by each layer.

    ``r`` (any form of :func:`requested_r`) or, when it is None, ``ratio``: the share of each layer's
    current unprotected tokens (MCTF's ratio form). ``layers`` restricts reduction to those layer indices.
    Every layer is capped at half of its unprotected tokens (bipartite matching cannot pair more), so no
    layer removes more than it can, and no layer leaves fewer than ``min_tokens`` (MCTF's floor: 10);
    the token count entering layer ``i + 1`` is ``num_tokens - sum(schedule[:i + 1])``.
    """
    if r is not None:
        wanted = requested_r(r, num_layers)
    else:
        wanted = None
    chosen = set(range(num_layers)) if layers is None else set(layers)
    schedule, n = [], num_tokens
    for i in range(num_layers):
        if i not in chosen:
            schedule.append(0)
            continue
        want = wanted[i] if wanted is not None else int(ratio * (n - protected))
        removed = max(0, min(want, (n - protected) // 2, n - min_tokens))
        schedule.append(removed)
        n -= removed
    return schedule
