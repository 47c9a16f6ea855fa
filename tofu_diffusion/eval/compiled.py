"""Timing variants compiled: each on its own copy of the model, patched once and compiled once.

Re-applying a variant between timed rounds (as the eager bench does) would give the compiled graphs new hook
objects to guard on, and so a recompile every round; a copy per variant keeps each variant's graphs warm, and the
baseline is compiled the same way, so that a speedup is against the compiled baseline.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch


def compile_model(model: torch.nn.Module, how: str, backend: str = "inductor") -> torch.nn.Module:
    """``model`` compiled with ``fullgraph=True``: whole, or its ``_repeated_blocks`` (regional)."""
    if how == "whole":
        return torch.compile(model, fullgraph=True, backend=backend)
    if how == "regional":
        if not getattr(model, "_repeated_blocks", None):
            raise ValueError(f"{type(model).__name__} declares no _repeated_blocks: compile it whole")
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
        return model
    raise ValueError(f"compile must be 'whole' or 'regional', not {how!r}")


def compiled_variants(model: torch.nn.Module, steps: dict[str, Callable], setups: dict[str, Callable],
                      how: str, backend: str = "inductor") -> tuple[dict[str, Callable], dict[str, Callable]]:
    """(steps, setups) for ``interleaved_times``: variant ``name`` is ``setups[name]`` applied to ``model`` and
    frozen in a compiled copy, which ``steps[name]`` (a function of the model it calls) then calls; the setups
    have nothing left to do. ``model`` is left unpatched; each copy has run twice, so that no timed round compiles.

    The copies share their block classes' forward code, and torch.compile counts recompiles per code object:
    its limit is raised to allow each variant its own graphs (a user's single patched model needs no such thing)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 8 * len(setups))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 64 * len(setups))
    compiled = {}
    for name, setup in setups.items():
        setup()
        compiled[name] = functools.partial(steps[name], compile_model(copy.deepcopy(model), how, backend))
        setups["baseline"]()  # the next variant starts from the unpatched model
        for _ in range(2):  # every graph it needs (a first call's, then the steady ones) before any timing
            compiled[name]()
    return compiled, {name: (lambda: None) for name in compiled}
