"""unmerge_mode="cached": a merged token's update is its slot's plus its own offset from its group at the block's
last unreduced step. The core identity, exactness (ratio 0, remove, seeded repeat) and that it is closer to the
unreduced model than copying, on every hook shape: whole joint blocks (SD3), per-sample rotary blocks (Flux), a
joint sequence with the image last (Chroma's single-stream blocks, under true CFG's two calls a step) or first
(Z-Image), sublayers (SD UNet)."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.core import bipartite_soft_matching, grid_partition
from tofu_diffusion.pipelines.tiny import (
    chroma_pipeline,
    chroma_prompt,
    flux_pipeline,
    flux_prompt,
    prompt_embeds,
    sd3_pipeline,
    sd3_prompt,
    sd_pipeline,
    z_image_pipeline,
    z_image_prompt,
)


@pytest.mark.parametrize("mode", ["mean", "size_weighted", "mlerp", "prune"])
def test_offsets_restore_the_reference_and_leave_unmerged_tokens_their_slot(mode):
    g = torch.Generator().manual_seed(0)
    x, reference = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    src, dst = grid_partition((4, 4), (2, 2), key=3)
    plan = bipartite_soft_matching(x, src, dst, 6)
    # the update of the reference itself, merged, comes back as the reference: every token its own
    assert torch.allclose(plan.unmerge_with_offsets(plan.merge(reference, mode), reference, mode), reference,
                          atol=1e-5)
    y = torch.randn(2, plan.num_kept, 8, generator=g)
    out, copied = plan.unmerge_with_offsets(y, reference, mode), plan.unmerge(y)
    alone = plan.group_count == 1  # slots that stand for one token: that token gets the slot's value exactly
    for b in range(2):
        tokens = plan.kept_idx[b][alone[b]]
        assert torch.allclose(out[b, tokens], copied[b, tokens], atol=1e-6)
    assert not torch.allclose(out, copied)


def _sd3(pipe):
    return pipe(**sd3_prompt(), num_inference_steps=8, height=32, width=32, output_type="pt", guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0)).images


def _flux(pipe):
    return pipe(**flux_prompt(), num_inference_steps=8, height=32, width=32, output_type="pt", guidance_scale=0.0,
                generator=torch.Generator().manual_seed(0)).images


def _chroma(pipe):  # true CFG: two denoiser calls per step, each with its own stored updates
    return pipe(**chroma_prompt(), height=32, width=48, num_inference_steps=8, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def _z_image(pipe):  # the image at the start of one joint sequence
    return pipe(**z_image_prompt(), height=32, width=48, num_inference_steps=8, output_type="pt", guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0)).images


def _sd(pipe):
    e = prompt_embeds()
    return pipe(prompt_embeds=e, negative_prompt_embeds=torch.zeros_like(e), num_inference_steps=8, height=64,
                width=64, output_type="pt", generator=torch.Generator().manual_seed(0)).images


CASES = {"sd3": (sd3_pipeline, _sd3, {}), "flux": (flux_pipeline, _flux, {}),
         "chroma": (chroma_pipeline, _chroma, {}), "z_image": (z_image_pipeline, _z_image, {}),
         "sd": (sd_pipeline, _sd, {"merge_scope": "sublayers"})}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_cached_unmerge_is_exact_off_repeatable_and_closer_to_the_unreduced_model(kind):
    make, call, options = CASES[kind]
    pipe = make()
    base = call(pipe)
    with tofu.fused(pipe, method="tome", ratio=0.0, unmerge_mode="cached", **options):
        assert torch.equal(call(pipe), base)
    schedule = ((0.0, 0.0), (0.5, 0.75))  # 4 unreduced steps, then 4 at 0.75
    errors = {}
    for mode in ("copy", "cached"):
        tofu.apply(pipe, method="tome", schedule=schedule, unmerge_mode=mode, **options)
        out = call(pipe)
        assert torch.equal(call(pipe), out)  # the run's stored updates never reach the next run
        errors[mode] = (out - base).pow(2).mean().item()
        tofu.remove(pipe)
    assert torch.equal(call(pipe), base)
    assert 0 < errors["cached"] < errors["copy"]


def test_unmerge_mode_is_validated():
    with pytest.raises(ValueError, match="unknown unmerge_mode 'cache'"):
        tofu.TokenFusionConfig(unmerge_mode="cache")
    for limit in (0, -1.0):
        with pytest.raises(ValueError, match="unmerge_cache_gb is a memory limit in GB: give one > 0"):
            tofu.TokenFusionConfig(unmerge_cache_gb=limit)
    with pytest.raises(ValueError, match="unmerge_cache_gb must be a number"):
        tofu.TokenFusionConfig(unmerge_cache_gb="4GB")


def test_the_cached_unmerge_past_its_memory_limit_copies_and_says_so_once(caplog, monkeypatch):
    from tofu_diffusion.adapters import state

    pipe = sd3_pipeline()
    schedule = ((0.0, 0.0), (0.5, 0.75))
    outputs = {}
    for mode in ("copy", "cached"):
        tofu.apply(pipe, method="tome", schedule=schedule, unmerge_mode=mode)
        outputs[mode] = _sd3(pipe)
    assert not torch.equal(outputs["cached"], outputs["copy"])
    with caplog.at_level("WARNING", logger="tofu_diffusion"):
        # the tiny model stores a few kB per call: 1e-6 GB (about 1 kB) is too little
        tofu.apply(pipe, method="tome", schedule=schedule, unmerge_mode="cached", unmerge_cache_gb=1e-6)
        limited, again = _sd3(pipe), _sd3(pipe)
    assert torch.equal(limited, outputs["copy"]) and torch.equal(again, limited)
    said = [r.getMessage() for r in caplog.records if "unmerge_cache_gb" in r.getMessage()]
    assert len(said) == 1 and "unmerge by copying" in said[0]
    tofu.apply(pipe, method="tome", schedule=schedule, unmerge_mode="cached", unmerge_cache_gb=1.0)
    assert torch.equal(_sd3(pipe), outputs["cached"])
    # unset, the limit is a share of the device's memory
    assert state.device_memory(torch.device("cpu")) > 2**30
    monkeypatch.setattr(state, "CACHE_MEMORY_SHARE", 1e-12)
    tofu.apply(pipe, method="tome", schedule=schedule, unmerge_mode="cached")
    assert torch.equal(_sd3(pipe), outputs["copy"])
    tofu.remove(pipe)


def test_a_reused_plan_computes_its_offsets_once_and_gives_what_recomputing_them_gives(monkeypatch):
    from tofu_diffusion.adapters.planning import BlockState
    from tofu_diffusion.core import MergePlan

    pipe = sd3_pipeline()
    schedule = ((0.0, 0.0), (0.5, 0.75))  # 4 unreduced steps, then 4 at 0.75
    calls = []
    offsets = MergePlan.offsets
    monkeypatch.setattr(MergePlan, "offsets", lambda self, *a, **k: calls.append(id(self)) or offsets(self, *a, **k))
    handle = tofu.apply(pipe, method="tome", schedule=schedule, unmerge_mode="cached", plan_reuse_steps=3)
    reused = _sd3(pipe)
    planned = sum(block.plans_computed for block in handle.blocks)
    assert planned == 2 * len(handle.blocks)  # steps 4 and 6 of 0..7 plan (6 % 3 == 0), 5 and 7 reuse
    assert len(calls) == planned  # once per plan, not once per reduced step (4 per block)
    # what computing the offsets again at every reduced step gives, exactly
    monkeypatch.setattr(BlockState, "_offsets", lambda self, call, key, plan, reference, dtype:
                        plan.offsets(reference.to(dtype), self.merge_mode))
    calls.clear()
    assert torch.equal(_sd3(pipe), reused)
    assert len(calls) == 4 * len(handle.blocks)
    tofu.remove(pipe)


def test_explain_says_what_the_cached_unmerge_stores():
    pipe = sd3_pipeline()
    schedule = ((0.0, 0.0), (0.5, 0.75))
    cached = tofu.explain(pipe, num_inference_steps=8, height=32, width=32, schedule=schedule, unmerge_mode="cached")
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    reduced = [b for b in cached.blocks if b.reduced]
    assert reduced and cached.stored_bytes == sum(b.tokens for b in reduced) * width * 4  # float32
    assert "MB stored per sample and denoiser call" in str(cached)
    copied = tofu.explain(pipe, num_inference_steps=8, height=32, width=32, schedule=schedule)
    assert copied.stored_bytes == 0 and "stored" not in str(copied)
