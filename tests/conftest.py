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


def check_reduced_exactly(model, run, inputs, method, counts, **options):
    """A family's contract on one denoiser call: ratio 0 is bit-exact; ``method`` at ratio 0.5 keeps the output's
    shape, changes it and repeats it exactly, with each reduced block's (tokens in, tokens out) as ``counts``
    ({block name: (in, out)}); remove() gives the original back bit for bit. Returns the reduced output."""
    import tofu_diffusion as tofu

    base = run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0, **options):
        assert torch.equal(run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5, **options)
    out = run(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(run(model, inputs), out)
    assert handle.token_counts() == counts
    tofu.remove(model)
    assert torch.equal(run(model, inputs), base)
    return out


def record_rotary_attention(model, attention, run, inputs, block, **options):
    """``model`` reduced (tome at 0.5 unless ``options`` say otherwise), recording every call of ``attention`` and
    the model's full rotary table (``model.rope``): (the attention calls' keyword arguments, the full table, the
    plan of ``block``, the reduced output)."""
    import tofu_diffusion as tofu

    seen, full = [], {}
    attention.register_forward_pre_hook(lambda m, a, k: seen.append(k) and None, with_kwargs=True)
    model.rope.register_forward_hook(lambda m, a, out: full.update(rotary=out) and None)
    handle = tofu.apply(model, **{"method": "tome", "ratio": 0.5, **options})
    out = run(model, inputs)
    return seen, full["rotary"], handle.last_plans()[block][0], out


def check_samples_alone(model, run, inputs, together):
    """Each sample run alone equals itself in the batch (plans per sample)."""
    for i in range(together.shape[0]):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        assert torch.allclose(run(model, one)[0], together[i], atol=1e-5)
