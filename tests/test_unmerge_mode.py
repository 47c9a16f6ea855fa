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
