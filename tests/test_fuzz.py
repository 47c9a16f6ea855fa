"""Fuzzing the life of a patch: random sequences of apply / call / remove / re-apply / refused requests / calls
on other threads / calls that raise / scoped ``fused`` blocks, on every kind of model. After every step the
model does exactly what its current patch promises: the unmodified output with no patch (bit for bit), the
same output as the patch's first call otherwise, whatever ran in between.

``TOFU_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` runs it at length (the suite keeps it short).
"""

import os
import threading

import pytest
import torch
from conftest import denoiser_inputs, run_denoiser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import _family_inputs, _raised_by_library

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import (
    dit_transformer,
    flux_transformer,
    pixart_transformer,
    sd3_transformer,
    sd_unet,
)

EXAMPLES = int(os.environ.get("TOFU_FUZZ_EXAMPLES", "24"))
_MODELS = {}


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=64, num_labels=6)
    return ViTForImageClassification(config).eval()


_BUILDERS = {"sd": sd_unet, "dit": dit_transformer, "pixart": pixart_transformer, "sd3": sd3_transformer,
             "flux": flux_transformer, "vit": _vit}

# Requests each kind must refuse, touching nothing: a ratio past its limit, blocks / layers / levels that do
# not exist, the other kind of model's options, an option of the wrong type, a name that is no option.
_DENOISER_REFUSALS = [{"ratio": 0.8}, {"ratio": 0.5, "blocks": [99]}, {"r": 4}, {"ratio": 0.5, "stride": (0, 2)},
                      {"ratio": "half"}, {"method": "merge"}, {"rate": 0.5}, {"ratio": 0.5, "seed": "zero"}]
_REFUSALS = {"vit": [{"ratio": 0.8}, {"r": [1] * 9}, {"r": 2, "layers": [99]}, {"ratio": 0.5, "levels": [1]},
                     {"method": "todo", "r": 2}, {"r": 8.0}, {"rate": 0.5}, {"r": 2, "merge_scope": "sublayers"}],
             "sd": _DENOISER_REFUSALS + [{"ratio": 0.5, "levels": [64]}]}


def _model(kind):
    if kind not in _MODELS:
        _MODELS[kind] = _BUILDERS[kind]()
    return _MODELS[kind]


def _call(kind):
    """A call of the model: (positional, keyword) inputs, and a function returning its output tensor."""
    model = _model(kind)
    if kind == "vit":
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        return lambda: model(images).logits
    args, kwargs = _family_inputs(kind, 2, 16, 16, torch.float32) if kind in ("sd3", "flux") else \
        denoiser_inputs(kind)
    return lambda: run_denoiser(model, args, kwargs)


def _failing_call(kind):
    """A call the model itself cannot take (an input of the wrong width): it raises inside the model."""
    model = _model(kind)
    if kind == "vit":
        return lambda: model(torch.randn(2, 5, 32, 32))
    if kind == "flux":
        args, kwargs = _family_inputs(kind, 2, 16, 16, torch.float32)
        return lambda: run_denoiser(model, (args[0][..., :7],), kwargs)
    args, kwargs = _family_inputs(kind, 2, 16, 16, torch.float32) if kind == "sd3" else denoiser_inputs(kind)
    return lambda: run_denoiser(model, (args[0][:, :3], *args[1:]), kwargs)


def _valid_request(kind, draw):
    method = draw(st.sampled_from(tofu.CLASSIFIER_METHODS if kind == "vit" else ("tome", "tofu", "mctf")))
    if kind == "vit":
        return {"method": method, "r": draw(st.integers(0, 6))}
    scopes = ["block"] if kind in ("sd3", "flux") else ["block", "sublayers"]  # joint blocks are reduced whole
    return {"method": method, "ratio": draw(st.sampled_from([0.0, 0.25, 0.5, 0.75])),
            "merge_scope": draw(st.sampled_from(scopes))}


def _no_hooks_left(model) -> bool:
    return not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ or getattr(m, "_forward_hooks", None)
                   for m in model.modules())


OPS = ("apply", "refused", "call", "thread", "raise", "remove", "fused")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(sorted(_BUILDERS)), data=st.data())
@pytest.mark.slow
def test_every_sequence_keeps_the_patchs_promise(kind, data):
    model, call, failing = _model(kind), _call(kind), _failing_call(kind)
    refusals = _REFUSALS.get(kind, _DENOISER_REFUSALS)
    base = call()
    handle, expected = None, base  # the live patch, and what a call must give under it (None: not seen yet)

    def check(output):
        nonlocal expected
        if expected is None:
            expected = output
        assert torch.equal(output, expected)

    try:
        for op in data.draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=8), label="ops"):
            if op == "apply":
                handle, expected = tofu.apply(model, **_valid_request(kind, data.draw)), None
            elif op == "refused":
                request = data.draw(st.sampled_from(refusals), label="refused request")
                with pytest.raises((ValueError, TypeError)) as caught:
                    tofu.apply(model, **request)
                assert _raised_by_library(caught.value), f"{request}: {caught.value!r} came from outside"
                assert tofu.handle_of(model) is handle  # the previous patch is untouched
            elif op == "call":
                check(call())
            elif op == "thread":
                out = []
                worker = threading.Thread(target=lambda: out.append(call()))
                worker.start()
                worker.join()
                check(out[0])
            elif op == "raise":
                with pytest.raises((RuntimeError, ValueError)):  # the model's own refusal of the input
                    failing()
            elif op == "remove":
                if handle is not None:
                    handle.remove()
                    handle, expected = None, base
                    assert _no_hooks_left(model)
                else:
                    with pytest.raises(ValueError):
                        tofu.remove(model)
            elif op == "fused":
                with tofu.fused(model, **_valid_request(kind, data.draw)):
                    call()
                # the scope gave back the patch that was there, and the user's handle to it still works
                assert tofu.handle_of(model) is handle
            if handle is not None:
                assert tofu.handle_of(model) is handle
        check(call())
    finally:
        if tofu.handle_of(model) is not None:
            tofu.remove(model)
    assert torch.equal(call(), base) and _no_hooks_left(model)
