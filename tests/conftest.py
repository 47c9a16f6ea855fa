import os
import sys

import pytest
import torch

from tofu_diffusion.pipelines.tiny import (
    TEXT_DIM,
    dit_transformer,
    pixart_transformer,
    sd_unet,
    sdxl_added_cond,
    sdxl_unet,
)

sys.path.insert(0, os.path.dirname(__file__))
THREADS = max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True)
def _threads_restored():
    """No test leaves torch at another thread count for the tests after it."""
    yield
    torch.set_num_threads(THREADS)


# ---------------------------------------------------------------- shared helpers of the denoiser tests
def denoiser_inputs(kind, batch=2, h=16, w=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, h, w, generator=g).to(dtype)
    t = torch.tensor([500] * batch)
    if kind == "sd":
        return (x, t, torch.randn(batch, 7, TEXT_DIM, generator=g).to(dtype)), {}
    if kind == "sdxl":
        cond = {k: v.to(dtype) for k, v in sdxl_added_cond(batch).items()}
        return (x, t, torch.randn(batch, 7, TEXT_DIM, generator=g).to(dtype)), {"added_cond_kwargs": cond}
    if kind == "dit":
        return (x,), {"timestep": t, "class_labels": torch.arange(batch) % 10}
    if kind == "pixart":
        cond = {"resolution": None, "aspect_ratio": None}
        return (x,), {"encoder_hidden_states": torch.randn(batch, 7, TEXT_DIM, generator=g).to(dtype), "timestep": t,
                      "added_cond_kwargs": cond}
    raise ValueError(kind)


DENOISERS = {"sd": sd_unet, "sdxl": sdxl_unet, "dit": dit_transformer, "pixart": pixart_transformer}


def run_denoiser(model, args, kwargs):
    return model(*args, **kwargs, return_dict=False)[0]
