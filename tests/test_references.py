"""Reference-image tokens (Flux.1 Kontext, Flux.2 with images, Qwen-Image-Edit): the target image's tokens are
reduced, every reference token is kept whole - it enters each block as it is, with its own rotary row and
per-token conditioning, and comes out as the block computed it - or, with ``reduce_references=True``, each
reference is reduced on its own grid. Exact at ratio 0 and after remove(); a sample alone equals itself in a
batch; the edit pipelines end to end."""

import numpy as np
import pytest
import torch
from PIL import Image

import tofu_diffusion as tofu
from tofu_diffusion.adapters.qwen_image import per_token_index
from tofu_diffusion.pipelines.tiny import (
    TEXT_DIM,
    flux2_pipeline,
    flux2_prompt,
    flux2_transformer,
    flux_kontext_pipeline,
    flux_prompt,
    flux_transformer,
    qwen_image_edit_pipeline,
    qwen_image_prompt,
)

METHODS = ["tome", "tofu", "mctf"]


def _flux_ids(h, w, image):
    ids = torch.zeros(h, w, 3)
    ids[..., 0], ids[..., 1], ids[..., 2] = image, torch.arange(h)[:, None], torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def _kontext_inputs(batch=2, h=4, w=6, ref=(4, 4)):
    """Flux.1 Kontext's layout: the target's 4x6 tokens, then a 4x4 reference with image index 1."""
    g = torch.Generator().manual_seed(3)
    n = h * w + ref[0] * ref[1]
    return {"hidden_states": torch.randn(batch, n, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g),
            "pooled_projections": torch.randn(batch, TEXT_DIM, generator=g), "timestep": torch.full((batch,), 0.5),
            "img_ids": torch.cat([_flux_ids(h, w, 0), _flux_ids(*ref, 1)]), "txt_ids": torch.zeros(9, 3)}


def _flux2_inputs(batch=2, h=4, w=6, ref=(4, 4)):
    """Flux.2's layout: the target, then a reference with image index 10 (Flux2Pipeline's first reference)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.cartesian_prod(torch.tensor([t]), torch.arange(a), torch.arange(b), torch.arange(1))
                     for t, (a, b) in ((0, (h, w)), (10, ref))])
    text = torch.zeros(9, 4)
    text[:, 3] = torch.arange(9)
    return {"hidden_states": torch.randn(batch, len(ids), 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g),
            "timestep": torch.full((batch,), 0.5), "guidance": torch.full((batch,), 3.5),
            "img_ids": ids[None].expand(batch, -1, -1), "txt_ids": text[None].expand(batch, -1, -1)}


def _qwen_edit_model():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)  # the edit models' zero_cond_t: per-token modulate_index, 0 target / 1 reference
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                       axes_dims_rope=(8, 4, 4), zero_cond_t=True).eval()


def _qwen_edit_inputs(batch=2):
    g = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(batch, 24 + 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g),
            "timestep": torch.full((batch,), 0.5), "img_shapes": [[(1, 4, 6), (1, 4, 4)]] * batch}


FAMILIES = {"kontext": (flux_transformer, _kontext_inputs), "flux2": (flux2_transformer, _flux2_inputs),
            "qwen_edit": (_qwen_edit_model, _qwen_edit_inputs)}


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _one(inputs, i):
    batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
    out = {k: (v[i:i + 1] if k in batched else v) for k, v in inputs.items()}
    for k in ("img_ids", "txt_ids"):  # Flux.2's ids are batched
        if k in inputs and inputs[k].dim() == 3:
            out[k] = inputs[k][i:i + 1]
    if "img_shapes" in inputs:
        out["img_shapes"] = inputs["img_shapes"][:1]
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_target_reduced_references_whole_exact_and_batch_consistent(family, method):
    build, make_inputs = FAMILIES[family]
    model, inputs = build(), make_inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5)
    together = _run(model, inputs)
    assert together.shape == base.shape and torch.isfinite(together).all() and not torch.allclose(together, base)
    assert set(handle.token_counts().values()) == {(24, 12)}  # the target's 4x6 tokens; the 16 references whole
    assert handle.blocks[0].grid.latest == (4, 6)
    assert torch.equal(_run(model, inputs), together)
    for i in range(2):
        assert torch.allclose(_run(model, _one(inputs, i))[0], together[i], atol=1e-5)
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_reference_tokens_keep_their_rotary_rows_and_enter_as_they_are():
    model = flux_transformer()
    inputs = _kontext_inputs(batch=1)
    seen = []
    model.transformer_blocks[0].attn.register_forward_pre_hook(lambda m, a, k: seen.append(k) and None,
                                                               with_kwargs=True)
    full_cos = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))[0]
    handle = tofu.apply(model, method="tome", ratio=0.5)
    _run(model, inputs)
    kept = handle.last_plans()["transformer_blocks.0"][0].kept_idx[0]
    tofu.remove(model)
    _run(model, inputs)
    reduced, whole = seen
    assert reduced["hidden_states"].shape[1] == 12 + 16
    # text rows, the kept target tokens' rows, then every reference row
    assert torch.equal(reduced["image_rotary_emb"][0], torch.cat([full_cos[:9], full_cos[9 + kept],
                                                                  full_cos[9 + 24:]]))
    assert torch.equal(reduced["hidden_states"][:, 12:], whole["hidden_states"][:, 24:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_reduced_references_each_on_its_own_grid_exact_and_batch_consistent(family, method):
    build, make_inputs = FAMILIES[family]
    model, inputs = build(), make_inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0, reduce_references=True):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5, reduce_references=True)
    together = _run(model, inputs)
    assert together.shape == base.shape and torch.isfinite(together).all()
    # the 4x6 target and the 4x4 reference each lose half: 12 + 8 of 40
    assert set(handle.token_counts().values()) == {(40, 20)}
    plan = handle.last_plans()["transformer_blocks.0"][0]
    image_of = (torch.arange(40) >= 24).long()  # 0: the target's tokens, 1: the reference's
    for b in range(2):  # no token merges into another image
        kept_image = image_of[plan.kept_idx[b]]
        assert kept_image.sum() == 8
        assert torch.equal(image_of[plan.src_idx[b]], kept_image[plan.src_slot[b]])
    assert torch.equal(_run(model, inputs), together)
    for i in range(2):
        assert torch.allclose(_run(model, _one(inputs, i))[0], together[i], atol=1e-5)
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_reduced_references_keep_the_rotary_rows_of_their_kept_tokens():
    model = flux_transformer()
    inputs = _kontext_inputs(batch=1)
    seen = []
    model.transformer_blocks[0].attn.register_forward_pre_hook(lambda m, a, k: seen.append(k) and None,
                                                               with_kwargs=True)
    full_cos = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))[0]
    handle = tofu.apply(model, method="tome", ratio=0.5, reduce_references=True)
    _run(model, inputs)
    kept = handle.last_plans()["transformer_blocks.0"][0].kept_idx[0]
    assert seen[0]["hidden_states"].shape[1] == 12 + 8
    assert torch.equal(seen[0]["image_rotary_emb"][0], torch.cat([full_cos[:9], full_cos[9 + kept]]))
    tofu.remove(model)


def test_reduce_references_is_refused_where_no_reference_can_come_and_when_they_do_not_tile():
    from tofu_diffusion.pipelines.tiny import sd3_transformer

    with pytest.raises(ValueError, match="takes no reference images"):
        tofu.apply(sd3_transformer(), ratio=0.5, reduce_references=True)
    model = flux_transformer()
    inputs = _kontext_inputs(batch=1)
    ids = inputs["img_ids"].clone()
    ids[24:] = ids[24:].flip(0)  # the reference's ids no longer row-major
    with tofu.fused(model, method="tome", ratio=0.5, reduce_references=True):
        with pytest.raises(ValueError, match="do not tile a grid"):
            _run(model, {**inputs, "img_ids": ids})
    with tofu.fused(model, method="tome", ratio=0.5):  # kept whole, they need not tile
        assert _run(model, {**inputs, "img_ids": ids}).shape == inputs["hidden_states"].shape


def test_qwen_edit_modulate_index_keeps_the_references_index():
    model = _qwen_edit_model()
    handle = tofu.apply(model, method="tome", ratio=0.5)
    _run(model, _qwen_edit_inputs())
    plan = handle.last_plans()["transformer_blocks.0"][0]
    index = torch.cat([torch.zeros(2, 24, dtype=torch.long), torch.ones(2, 16, dtype=torch.long)], dim=1)
    # the follower over the whole image stream: the kept target tokens' 0s, then every reference token's 1
    kept = per_token_index(index, plan.within(0, 40))
    assert torch.equal(kept, torch.cat([torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 16, dtype=torch.long)],
                                       dim=1))


def test_targets_interleaved_with_references_are_refused_clearly():
    model = flux_transformer()
    inputs = _kontext_inputs(batch=1)
    ids = inputs["img_ids"]
    split = torch.cat([ids[:12], ids[24:], ids[12:24]])  # half the target, the reference, the other half
    with tofu.fused(model, method="tome", ratio=0.5):
        with pytest.raises(ValueError, match="interleave the target"):
            _run(model, {**inputs, "img_ids": split})


def _reference(size=(64, 96)):
    return Image.fromarray((np.random.RandomState(0).rand(*size, 3) * 255).astype("uint8"))


def _seeded(pipe, **call):
    return pipe(**call, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("reduce_references", [False, True])
@pytest.mark.parametrize("name", ["kontext", "flux2"])
def test_edit_pipelines_end_to_end(name, reduce_references):
    if name == "kontext":
        pipe = flux_kontext_pipeline()
        # its defaults resize to about 1024x1024: keep the test's size
        call = dict(**flux_prompt(), image=_reference((32, 48)), height=32, width=48, max_area=32 * 48,
                    _auto_resize=False, guidance_scale=2.5)
    else:
        pipe = flux2_pipeline()
        call = dict(**flux2_prompt(), image=[_reference()], height=32, width=48)
    base = _seeded(pipe, **call)
    handle = tofu.apply(pipe, method="tome", ratio=0.5, reduce_references=reduce_references)
    reduced = _seeded(pipe, **call)
    counts = handle.token_counts()
    reference = 96 if name == "kontext" else 384  # Kontext's 32x48 reference; Flux.2 keeps its 64x96
    # the 8x12 target's tokens only, or the target's and the reference's
    assert set(counts.values()) == ({(96 + reference, 48 + reference // 2)} if reduce_references else {(96, 48)})
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    assert torch.equal(_seeded(pipe, **call), reduced)
    tofu.remove(pipe)
    assert torch.equal(_seeded(pipe, **call), base)


@pytest.mark.slow
def test_qwen_image_edit_pipeline_end_to_end_with_true_cfg():
    pipe = qwen_image_edit_pipeline()  # resizes the reference to about 1024x1024: 4,096 reference tokens
    call = dict(**qwen_image_prompt(), image=_reference((32, 48)), height=64, width=96, true_cfg_scale=4.0)
    base = _seeded(pipe, **call)
    handle = tofu.apply(pipe, method="tome", schedule=((0.0, 0.5),))  # a schedule: the step is tracked
    steps = []
    pipe.transformer.register_forward_hook(lambda *_: steps.append(handle.blocks[0].run.step().index))
    reduced = _seeded(pipe, **call)
    assert steps == [0, 0, 1, 1]  # true CFG: the conditional and unconditional calls of a step are one step
    assert handle.token_counts()["transformer_blocks.0"] == (24, 12)
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    tofu.remove(pipe)
    assert torch.equal(_seeded(pipe, **call), base)


def test_the_reference_measurement_compares_whole_and_reduced_references():
    from tofu_diffusion.eval.references import measure, table

    torch.manual_seed(0)
    rows, about = measure(size=8, ratios=(0.5,), width=64, repeats=1, warmup=0, train_steps=2)
    by = {row["setting"]: row for row in rows}
    assert by["baseline"]["error"] == 0 and by["baseline"]["removed"] == 0
    whole, reduced = by["references whole, ratio 0.5"], by["references reduced, ratio 0.5"]
    # the reference is as large as the target: keeping it whole removes half as many of the image's tokens
    assert whole["removed"] == pytest.approx(0.25) and reduced["removed"] == pytest.approx(0.5)
    assert whole["error"] > 0 and reduced["error"] > 0 and reduced["reduce_references"]
    assert all(v > 0 for v in about["error_with_another_reference"].values()) and len(about["losses"]) == 2
    assert "references reduced, ratio 0.5" in table(rows, about)
