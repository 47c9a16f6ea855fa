"""Fuzzing the life of a patch: random sequences of apply / call / remove / re-apply / refused requests / calls
on other threads / calls that raise / scoped ``fused`` blocks, on every registered family (``family_cases``).
After every step the model does exactly what its current patch promises: the unmodified output with no patch
(bit for bit), the same output as the patch's first call otherwise, whatever ran in between.

``TOFU_FUZZ_EXAMPLES=72 pytest tests/test_fuzz.py`` runs it at length (about 1,000 sequences over the 15 cases;
the suite runs 6 per case).
"""

import os
import threading

import pytest
import torch
from family_cases import CASES, family_of_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import _raised_by_library

import tofu_diffusion as tofu
from tofu_diffusion.adapters import FAMILIES

EXAMPLES = int(os.environ.get("TOFU_FUZZ_EXAMPLES", "6"))  # per case
_MODELS = {}
_SCOPES = {}

# Requests each kind must refuse, touching nothing: a ratio past its limit, blocks / layers / levels that do
# not exist, the other kind of model's options, an option of the wrong type, a name that is no option.
_DENOISER_REFUSALS = [{"ratio": 0.8}, {"ratio": 0.5, "blocks": [99]}, {"r": 4}, {"ratio": 0.5, "stride": (0, 2)},
                      {"ratio": "half"}, {"method": "merge"}, {"rate": 0.5}, {"ratio": 0.5, "seed": "zero"},
                      {"ratio": 0.5, "share_guidance_plans": "yes"}]
_REFUSALS = {"vit": [{"ratio": 0.8}, {"r": [1] * 9}, {"r": 2, "layers": [99]}, {"ratio": 0.5, "levels": [1]},
                     {"method": "todo", "r": 2}, {"r": 8.0}, {"rate": 0.5}, {"r": 2, "merge_scope": "sublayers"}],
             "unet": _DENOISER_REFUSALS + [{"ratio": 0.5, "levels": [64]}]}


def test_every_registered_family_has_a_case():
    assert {family_of_case(name) for name in CASES} == {adapter.family for adapter in FAMILIES}


def _model(kind):
    if kind not in _MODELS:
        _MODELS[kind] = CASES[kind].build()
    return _MODELS[kind]


def _call(kind):
    """A call of the model: a function returning its output tensor."""
    model, case = _model(kind), CASES[kind]
    inputs = case.inputs()
    return lambda: case.run(model, inputs)


def _failing_call(kind):
    """A call the model itself cannot take (an input of the wrong width): it raises inside the model."""
    model, case = _model(kind), CASES[kind]
    inputs = case.broken(case.inputs())
    return lambda: case.run(model, inputs)


def _scopes(kind):
    """The merge scopes the family takes (joint-stream blocks are reduced whole): asked of the library once."""
    if kind not in _SCOPES:
        try:
            tofu.apply(_model(kind), method="tome", ratio=0.5, merge_scope="sublayers")
            _SCOPES[kind] = ("block", "sublayers")
            tofu.remove(_model(kind))
        except ValueError:
            _SCOPES[kind] = ("block",)
    return _SCOPES[kind]


def _valid_request(kind, draw):
    method = draw(st.sampled_from(tofu.CLASSIFIER_METHODS if kind == "vit" else ("tome", "tofu", "mctf")))
    if kind == "vit":
        return {"method": method, "r": draw(st.integers(0, 6))}
    return {"method": method, "ratio": draw(st.sampled_from([0.0, 0.25, 0.5, 0.75])),
            "merge_scope": draw(st.sampled_from(_scopes(kind)))}


def _no_hooks_left(model) -> bool:
    return not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ or getattr(m, "_forward_hooks", None)
                   for m in model.modules())


OPS = ("apply", "refused", "call", "thread", "raise", "remove", "fused")


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CASES))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_sequence_keeps_the_patchs_promise(kind, data):
    model, call, failing = _model(kind), _call(kind), _failing_call(kind)
    refusals = _REFUSALS.get(family_of_case(kind), _DENOISER_REFUSALS)
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
