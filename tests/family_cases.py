"""One tiny model and one call per registered family, for the tests that run over every family (the fuzz).

``CASES`` is keyed by the registry's family names (``family:variant`` for a second model of a family);
``test_every_registered_family_has_a_case`` fails when a family lands without one. Inputs come from each
family's own test module, so a family's call is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from conftest import denoiser_inputs, run_denoiser
from test_properties import _family_inputs

from tofu_diffusion.pipelines import tiny, tiny_video


@dataclass(frozen=True)
class FamilyCase:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], object]  # what ``run`` takes
    run: Callable[[torch.nn.Module, object], torch.Tensor]
    broken: Callable[[object], object]  # the inputs made into ones the model itself refuses


def _narrower(value):
    """A tensor (or list of them) one channel narrower: a projection of the model refuses it."""
    if isinstance(value, (list, tuple)):
        return type(value)(_narrower(v) for v in value)
    return value[..., :-1]


def _changed(where, change):
    """``inputs`` with the entry at ``where`` (a key, or an index of a tuple) changed."""
    def apply(inputs):
        if isinstance(inputs, dict):
            return {**inputs, where: change(inputs[where])}
        return tuple(change(v) if i == where else v for i, v in enumerate(inputs))
    return apply


def _own(name: str, build, text="encoder_hidden_states") -> FamilyCase:
    import importlib

    module = importlib.import_module(f"test_{name}")
    return FamilyCase(build, module._inputs, module._run, _changed(text, _narrower))


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=64, num_labels=6)
    return ViTForImageClassification(config).eval()


def _vit_inputs():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))}


def _denoiser(kind: str, build) -> FamilyCase:
    """The image denoisers' (positional, keyword) inputs; the latent cut to 3 channels (Flux: 7 of 16 packed)."""
    if kind in ("sd3", "flux"):
        def inputs():
            return _family_inputs(kind, 2, 16, 16, torch.float32)
    else:
        def inputs():
            return denoiser_inputs(kind)
    cut = (lambda x: x[..., :7]) if kind == "flux" else (lambda x: x[:, :3])
    return FamilyCase(build, inputs, lambda model, call: run_denoiser(model, *call),
                      lambda call: (_changed(0, cut)(call[0]), call[1]))


CASES = {
    "unet": _denoiser("sd", tiny.sd_unet),
    "dit": _denoiser("dit", tiny.dit_transformer),
    "dit:pixart": _denoiser("pixart", tiny.pixart_transformer),
    "sd3": _denoiser("sd3", tiny.sd3_transformer),
    "flux": _denoiser("flux", tiny.flux_transformer),
    "wan": _own("wan", tiny_video.wan_transformer, text=2),
    "ltx": _own("ltx", tiny_video.ltx_transformer),
    "cogvideox": _own("cogvideox", tiny_video.cogvideox_transformer),
    "hunyuan_video": _own("hunyuan_video", tiny_video.hunyuan_video_transformer),
    "hunyuan_video15": _own("hunyuan_video15", tiny_video.hunyuan_video15_transformer),
    "chroma": _own("chroma", tiny.chroma_transformer),
    "qwen_image": _own("qwen_image", tiny.qwen_image_transformer),
    "flux2": _own("flux2", tiny.flux2_transformer),
    "z_image": _own("z_image", tiny.z_image_transformer, text=2),
    "vit": FamilyCase(_vit, _vit_inputs, lambda model, call: model(**call).logits,
                      _changed("pixel_values", lambda x: torch.cat([x, x[:, :2]], 1))),
}



def family_of_case(name: str) -> str:
    return name.split(":")[0]
