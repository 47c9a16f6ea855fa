"""Flux.2 (double-stream blocks returning (text, image), single-stream blocks on the joint [text; image] sequence,
4-axis rotary ids, fused q/k/v/MLP projection in the single blocks): only image tokens are reduced, text stays,
the rotary rows follow the kept tokens per sample; exact at ratio 0 and after remove(); non-square latents and
batch consistency; mctf's informativeness read from the fused projection; Flux2Pipeline end to end."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import tofu_diffusion as tofu
from tofu_diffusion.adapters.flux2 import FusedQueryKey
from tofu_diffusion.pipelines.tiny import TEXT_DIM, flux2_pipeline, flux2_prompt, flux2_transformer

METHODS = ["tome", "tofu", "mctf"]
BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0"]


def _ids(h, w, image=0):
    return torch.cartesian_prod(torch.tensor([image]), torch.arange(h), torch.arange(w), torch.arange(1))


def _inputs(batch=2, h=4, w=6):
    g = torch.Generator().manual_seed(3)
    text = torch.zeros(9, 4)
    text[:, 3] = torch.arange(9)
    return {"hidden_states": torch.randn(batch, h * w, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g),
            "timestep": torch.full((batch,), 0.5), "guidance": torch.full((batch,), 3.5),
            "img_ids": _ids(h, w)[None].expand(batch, -1, -1), "txt_ids": text[None].expand(batch, -1, -1)}


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method):
    model = flux2_transformer()
    inputs = _inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5)
    assert handle.family == "flux2" and [b.name for b in handle.blocks] == BLOCKS
    out = _run(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(_run(model, inputs), out)
    assert all(handle.token_counts()[name] == (24, 12) for name in BLOCKS)
    assert handle.blocks[0].grid.latest == (4, 6)  # non-square: rows x cols from img_ids
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_text_stays_rotary_rows_follow_and_batch_consistency():
    model = flux2_transformer()
    inputs = _inputs()
    seen = {"double": [], "single": []}
    model.transformer_blocks[0].attn.register_forward_pre_hook(lambda m, a, k: seen["double"].append(k) and None,
                                                               with_kwargs=True)
    model.single_transformer_blocks[0].attn.register_forward_pre_hook(
        lambda m, a, k: seen["single"].append(k) and None, with_kwargs=True)
    tables = []
    model.pos_embed.register_forward_hook(lambda m, a, out: tables.append(out) and None)
    handle = tofu.apply(model, method="tome", ratio=0.5)
    together = _run(model, inputs)
    image_table, text_table = tables[0], tables[1]  # the model embeds the image ids, then the text ids
    full = [torch.cat([t, i]) for t, i in zip(text_table, image_table)]
    for kind, name in (("double", BLOCKS[0]), ("single", BLOCKS[1])):
        plan = handle.last_plans()[name][0]
        assert len(seen[kind]) == 2  # once per sample: the rotary table is one for the batch
        for b, kwargs in enumerate(seen[kind]):
            rows = torch.cat([torch.arange(9), 9 + plan.kept_idx[b]])
            for got, table in zip(kwargs["image_rotary_emb"], full):
                assert torch.equal(got, table[rows])
            assert kwargs["hidden_states"].shape[1] == (12 if kind == "double" else 9 + 12)
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        assert torch.allclose(_run(model, one)[0], together[i], atol=1e-5)


def test_mctf_reads_queries_and_keys_from_the_fused_projection():
    attention = flux2_transformer().single_transformer_blocks[0].attn
    x = torch.randn(1, 5, attention.query_dim)
    fused = attention.to_qkv_mlp_proj(x)
    inner = attention.inner_dim
    view = FusedQueryKey(attention)
    assert torch.allclose(view.to_q(x), fused[..., :inner], atol=1e-6)
    assert torch.allclose(view.to_k(x), fused[..., inner:2 * inner], atol=1e-6)
    assert view.heads == attention.heads and view.norm_k is attention.norm_k


def test_todo_sublayers_and_kv_cache_are_refused_clearly():
    with pytest.raises(ValueError, match="todo is not available for Flux2Transformer2DModel"):
        tofu.apply(flux2_transformer(), method="todo", ratio=0.5)
    with pytest.raises(ValueError, match="merge_scope='block'"):
        tofu.apply(flux2_transformer(), method="tome", ratio=0.5, merge_scope="sublayers")
    model = flux2_transformer()
    with tofu.fused(model, method="tome", ratio=0.5):
        with pytest.raises(ValueError, match="reference KV cache"):
            model(**_inputs(), kv_cache_mode="extract", num_ref_tokens=4, return_dict=False)


def _image(pipe, **extra):
    return pipe(**flux2_prompt(), height=32, width=48, num_inference_steps=3, output_type="pt",
                generator=torch.Generator().manual_seed(0), **extra).images


@pytest.mark.parametrize("method", METHODS)
def test_flux2_pipeline_end_to_end(method):
    pipe = flux2_pipeline()
    base = _image(pipe)
    handle = tofu.apply(pipe, method=method, ratio=0.5)
    reduced = _image(pipe)
    assert handle.token_counts()[BLOCKS[1]] == (96, 48)
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    assert torch.equal(_image(pipe), reduced)
    tofu.remove(pipe)
    assert torch.equal(_image(pipe), base)


@pytest.mark.slow
def test_explain_gives_the_steps_flux2s_own_dynamic_shift_gives():
    # Flux2Pipeline computes mu from the sequence length and the number of steps, not Flux.1's linear rule
    pipe = flux2_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True,
                                                                 base_shift=0.5, max_shift=1.15, shift=3.0)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(kwargs["timestep"][0]) * 1000), with_kwargs=True)
    pipe(**flux2_prompt(), height=32, width=48, num_inference_steps=6, output_type="pt",
         generator=torch.Generator().manual_seed(0))
    hook.remove()
    plan = tofu.explain(pipe, num_inference_steps=6, height=32, width=48)
    assert [s.timestep for s in plan.steps] == pytest.approx(seen, abs=1e-3)
