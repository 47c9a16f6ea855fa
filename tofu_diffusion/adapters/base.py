"""What a model-family adapter provides: which models it patches, what it checks, what it attaches.

``api.apply`` only dispatches: it finds the adapter of a model (``adapters.adapter_for``), lets it check
the request (everything that can refuse, before an existing patch is touched), then attach. Adding a
family is one adapter file and one line in the registry (``adapters/__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass
class Site:
    """A transformer block that can be reduced."""

    name: str
    block: torch.nn.Module
    grid_owner: torch.nn.Module  # the module whose input defines this block's token grid
    level: int  # downsampling factor of its grid relative to the denoiser input (1 = full resolution)


@dataclass
class Patch:
    """What an adapter attached: the per-block (or per-layer) states, and optionally a function that reports
    token counts and one that undoes what is not a hook (both must be methods of copyable objects, so that
    ``copy.deepcopy`` of a patched model stays independent)."""

    blocks: list
    counts: Optional[Callable[[], dict]] = None
    undo: Optional[Callable[[], None]] = None


@dataclass(frozen=True)
class Adapter:
    """A model family. Subclasses implement ``check`` and ``attach``."""

    family: str  # the presets' key: "unet", "dit", "vit", ...
    classes: tuple  # the model classes it patches

    def matches(self, model: torch.nn.Module) -> bool:
        return isinstance(model, self.classes)

    def check(self, model: torch.nn.Module, config) -> Any:
        """Refuse what this family cannot do (clear errors); return what ``attach`` needs. Touches nothing."""
        raise NotImplementedError

    def attach(self, model: torch.nn.Module, config, checked: Any, scheduling=None) -> Patch:
        """Register the hooks (``registry.register``); everything registered is removed by
        ``registry.unregister_all``.

        ``scheduling``: the pipeline (or scheduler) whose sampling loop calls the model, None for a bare model;
        diffusion families locate each call's step in it (``steps.StepLocator``).
        """
        raise NotImplementedError

    def linearity_profile(self, model: torch.nn.Module, sample_inputs: Any) -> list[float]:
        """ToFu's criterion: the interpolation gap (``core.interpolation_gap``) of the layers from each depth
        to the end, on ``sample_inputs``. Families whose blocks do not form one chain do not provide it."""
        raise TypeError(f"switch-depth calibration is not available for {self.family} models (their blocks do not "
                        "form one chain of layers); set switch_depth explicitly")
