"""What a model-family adapter provides: the blocks that can be reduced, and how to read the grid."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Site:
    """A transformer block that can be reduced."""

    name: str
    block: torch.nn.Module
    grid_owner: torch.nn.Module  # the module whose input defines this block's token grid
    level: int  # downsampling factor of its grid relative to the denoiser input (1 = full resolution)


@dataclass
class Adapter:
    """A model family: finds its blocks (in execution order) and reads grids and timesteps."""

    family: str
    sites: Callable[[torch.nn.Module], list[Site]]
    grid_of: Callable[[torch.nn.Module, torch.Tensor], tuple[int, int]]
    default_levels: Callable[[list[Site]], set[int]]


def timestep_reader(module: torch.nn.Module) -> Callable[[tuple, dict], Optional[object]]:
    params = list(inspect.signature(type(module).forward).parameters)[1:]
    position = params.index("timestep") if "timestep" in params else None

    def read(args: tuple, kwargs: dict):
        if "timestep" in kwargs:
            return kwargs["timestep"]
        if position is not None and position < len(args):
            return args[position]
        return None

    return read
