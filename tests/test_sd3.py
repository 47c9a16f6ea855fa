"""SD3 / SD3.5 (joint attention): only image tokens are reduced, text tokens all stay, blocks return all N
image tokens; exact at ratio 0 and after remove(); the pipeline runs end to end."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM, sd3_pipeline, sd3_prompt, sd3_transformer

METHODS = ["tome", "tofu", "mctf", "todo"]


def _inputs(batch=2, h=16, w=16, t=500.0):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, h, w, generator=g),), {
        "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g),
        "pooled_projections": torch.randn(batch, TEXT_DIM, generator=g),
        "timestep": torch.full((batch,), t),
    }


def _run(model, args, kwargs):
    return model(*args, **kwargs, return_dict=False)[0]


@pytest.mark.slow
@pytest.mark.parametrize("sd35", [False, True], ids=["sd3", "sd3.5"])
@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(sd35, method):
    model = sd3_transformer(sd35=sd35)
    args, kwargs = _inputs()
    base = _run(model, args, kwargs)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(_run(model, args, kwargs), base)
    handle = tofu.apply(model, method=method, ratio=0.5)
    assert handle.family == "sd3" and len(handle.blocks) == 3  # every joint block, the last included
    first = _run(model, args, kwargs)
    assert first.shape == base.shape and not torch.equal(first, base)
    assert torch.equal(_run(model, args, kwargs), first)
    # image tokens in/out of every joint block: 8x8 = 64 in, 32 after merging (todo: 64 queries, and keys
    # and values of the 0.5-downsampled grid, round(8 * 0.707) = 6 per side)
    expected = (64, 36) if method == "todo" else (64, 32)
    assert handle.token_counts() == {f"transformer_blocks.{i}": expected for i in range(3)}
    tofu.remove(model)
    assert torch.equal(_run(model, args, kwargs), base)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())


def test_text_tokens_are_never_reduced_and_blocks_return_every_image_token():
    model = sd3_transformer()
    outer, inner = [], []

    def block_spy(block, args, kwargs, output):  # around the patched block: what the model's loop sees
        text, image = output
        outer.append((kwargs["encoder_hidden_states"].shape[1], None if text is None else text.shape[1],
                      kwargs["hidden_states"].shape[1], image.shape[1]))

    def attention_spy(attention, args, kwargs):  # inside the block: what the joint attention gets
        inner.append((kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1]))

    hooks = [block.register_forward_hook(block_spy, with_kwargs=True) for block in model.transformer_blocks]
    hooks += [b.attn.register_forward_pre_hook(attention_spy, with_kwargs=True) for b in model.transformer_blocks]
    with tofu.fused(model, method="tome", ratio=0.5):
        _run(model, *_inputs())
    for h in hooks:
        h.remove()
    # every block takes and returns all 64 image tokens and 9 text tokens (the last returns no text:
    # context_pre_only); its joint attention runs on 32 merged image tokens with all 9 text tokens
    assert outer == [(9, 9, 64, 64), (9, 9, 64, 64), (9, None, 64, 64)]
    assert inner == [(32, 9)] * 3


@pytest.mark.parametrize("size", [(16, 24), (20, 12)])
def test_non_square_latents_and_cfg_batch(size):
    model = sd3_transformer()
    args, kwargs = _inputs(batch=2, h=size[0], w=size[1])
    base = _run(model, args, kwargs)
    with tofu.fused(model, method="tome", ratio=0.5) as handle:
        out = _run(model, args, kwargs)
        n = size[0] * size[1] // 4
        assert handle.token_counts()["transformer_blocks.0"] == (n, n - n // 2)
    assert out.shape == base.shape and torch.isfinite(out).all()
    # each image of a batch equals the image computed alone (plans are per sample)
    with tofu.fused(model, method="tome", ratio=0.5):
        alone = _run(model, (args[0][1:],), {k: v[1:] for k, v in kwargs.items()})
    assert torch.allclose(out[1:], alone, atol=1e-5)


def test_sublayer_scope_gets_a_clear_error():
    model = sd3_transformer()
    with pytest.raises(ValueError, match="joint-attention blocks are reduced whole"):
        tofu.apply(model, method="tome", ratio=0.5, merge_scope="sublayers")
    assert not hasattr(model, "_diffusers_hook")


def test_todo_downsamples_image_keys_and_values_only():
    """At 0.75 (2x2 downsampling, nearest-exact = the odd rows and columns) the joint attention equals the
    unpatched one called with those image keys/values: all 64 image queries and 9 text tokens stay."""
    model = sd3_transformer(sd35=False)
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 64, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    handle = tofu.apply(model, method="todo", ratio=0.75)
    handle.blocks[0].grid.set((8, 8))
    got_image, got_text = attn(hidden_states=image, encoder_hidden_states=text)
    tofu.remove(model)
    # the reference: the same processor with keys/values from the strided grid, queries from all tokens
    strided = image.view(2, 8, 8, 16)[:, 1::2, 1::2].reshape(2, 16, 16)
    heads, d = attn.heads, 16 // attn.heads
    q = torch.cat([attn.to_q(image), attn.add_q_proj(text)], 1).view(2, -1, heads, d).transpose(1, 2)
    k = torch.cat([attn.to_k(strided), attn.add_k_proj(text)], 1).view(2, -1, heads, d).transpose(1, 2)
    v = torch.cat([attn.to_v(strided), attn.add_v_proj(text)], 1).view(2, -1, heads, d).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, -1, heads * d)
    assert torch.allclose(got_image, attn.to_out[0](out[:, :64]), atol=1e-5)
    assert torch.allclose(got_text, attn.to_add_out(out[:, 64:]), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_stable_diffusion_3_pipeline_end_to_end(method):
    pipe = sd3_pipeline()
    call = dict(**sd3_prompt(), num_inference_steps=2, height=32, width=32, output_type="pt", guidance_scale=4.0)
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with tofu.fused(pipe, method=method, ratio=0.5):
        first = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        again = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert first.shape == base.shape and torch.equal(first, again) and not torch.equal(first, base)
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, base)
