"""Flux (double- and single-stream joint blocks with rotary positions): only image tokens are reduced, each
keeps the rotary row of the token it stands at, blocks return all N image tokens; exact at ratio 0 and after
remove(); per-sample plans (an image never depends on its batch-mates); FluxPipeline end to end."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM, flux_pipeline, flux_prompt, flux_transformer

METHODS = ["tome", "tofu", "mctf"]
BLOCKS = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(2)]


def _ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def _inputs(batch=2, h=8, w=8, t=0.5):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, h * w, 16, generator=g),), {
        "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g),
        "pooled_projections": torch.randn(batch, TEXT_DIM, generator=g),
        "timestep": torch.full((batch,), t), "img_ids": _ids(h, w), "txt_ids": torch.zeros(9, 3),
    }


def _run(model, args, kwargs):
    return model(*args, **kwargs, return_dict=False)[0]


@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method):
    model = flux_transformer()
    args, kwargs = _inputs()
    base = _run(model, args, kwargs)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(_run(model, args, kwargs), base)
    handle = tofu.apply(model, method=method, ratio=0.5)
    assert handle.family == "flux"
    first = _run(model, args, kwargs)
    assert first.shape == base.shape and not torch.equal(first, base)
    assert torch.equal(_run(model, args, kwargs), first)
    assert handle.token_counts() == {name: (64, 32) for name in BLOCKS}  # double and single blocks alike
    tofu.remove(model)
    assert torch.equal(_run(model, args, kwargs), base)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())


def test_text_tokens_stay_rotary_rows_follow_the_kept_tokens_and_blocks_return_every_image_token():
    model = flux_transformer()
    args, kwargs = _inputs(batch=1)
    seen = []

    def attention_spy(attention, a, k):
        cos, _ = k["image_rotary_emb"]
        seen.append((k["hidden_states"].shape[1], cos))

    def block_spy(block, a, k, output):
        seen.append(("out", output[0].shape[1], output[1].shape[1]))

    hooks = [b.attn.register_forward_pre_hook(attention_spy, with_kwargs=True) for b in model.transformer_blocks]
    hooks += [b.register_forward_hook(block_spy, with_kwargs=True) for b in model.transformer_blocks]
    full_cos = model.pos_embed(torch.cat([kwargs["txt_ids"], kwargs["img_ids"]]))[0]
    handle = tofu.apply(model, method="tome", ratio=0.5)
    _run(model, args, kwargs)
    plans = handle.last_plans()
    for h in hooks:
        h.remove()
    tofu.remove(model)
    attention_calls = [s for s in seen if s[0] != "out"]
    assert [n for n, _ in attention_calls] == [32, 32]  # the double blocks' image stream, merged
    for (_, cos), name in zip(attention_calls, BLOCKS[:2]):
        kept = plans[name][0].kept_idx[0]
        # text rows first, unchanged; then each kept image token's own row (a group: its destination's)
        assert torch.equal(cos, torch.cat([full_cos[:9], full_cos[9 + kept]]))
    assert [s for s in seen if s[0] == "out"] == [("out", 9, 64)] * 2  # all 9 text and 64 image tokens out


def test_per_sample_plans_and_non_square_grid():
    model = flux_transformer()
    args, kwargs = _inputs(batch=2, h=6, w=10)
    with tofu.fused(model, method="tome", ratio=0.5) as handle:
        both = _run(model, args, kwargs)
        alone = _run(model, (args[0][1:],), {k: (v[1:] if k in ("encoder_hidden_states", "pooled_projections",
                                                                   "timestep") else v) for k, v in kwargs.items()})
        assert handle.token_counts()["transformer_blocks.0"] == (60, 30)
    assert torch.allclose(both[1:], alone, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_flux_pipeline_end_to_end(method):
    pipe = flux_pipeline()
    call = dict(**flux_prompt(), num_inference_steps=2, height=32, width=32, output_type="pt", guidance_scale=0.0)
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with tofu.fused(pipe, method=method, ratio=0.5) as handle:
        first = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        again = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        assert handle.token_counts()["single_transformer_blocks.1"] == (64, 32)
    assert first.shape == base.shape and torch.equal(first, again) and not torch.equal(first, base)
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, base)


def test_todo_and_sublayer_scope_get_a_clear_error():
    model = flux_transformer()
    with pytest.raises(ValueError, match="todo is not available for FluxTransformer2DModel"):
        tofu.apply(model, method="todo", ratio=0.5)
    with pytest.raises(ValueError, match="reduced whole"):
        tofu.apply(model, method="tome", ratio=0.5, merge_scope="sublayers")
    assert not hasattr(model, "_diffusers_hook")
