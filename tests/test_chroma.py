"""Chroma (Flux-like double-stream blocks, single-stream blocks on the joint [text; image] sequence, a mask over
[text; image]): only image tokens are reduced, every text token stays, the mask and the rotary rows follow the
kept tokens per sample; exact at ratio 0 and after remove(); batch consistency; ChromaPipeline end to end."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import TEXT_DIM, chroma_pipeline, chroma_prompt, chroma_transformer

METHODS = ["tome", "tofu", "mctf"]
BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0"]


def _ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def _inputs(batch=2, h=6, w=8):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, 9 + h * w)
    mask[0, 6:9] = 0  # the first sample's text is padded
    return {"hidden_states": torch.randn(batch, h * w, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 9, TEXT_DIM, generator=g),
            "timestep": torch.full((batch,), 0.5), "img_ids": _ids(h, w), "txt_ids": torch.zeros(9, 3),
            "attention_mask": mask}


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("method", METHODS)
def test_exact_at_ratio_zero_and_after_remove_and_repeatable(method):
    model = chroma_transformer()
    inputs = _inputs()
    base = _run(model, inputs)
    with tofu.fused(model, method=method, ratio=0.0):
        assert torch.equal(_run(model, inputs), base)
    handle = tofu.apply(model, method=method, ratio=0.5)
    assert handle.family == "chroma" and [b.name for b in handle.blocks] == BLOCKS
    out = _run(model, inputs)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.allclose(out, base)
    assert torch.equal(_run(model, inputs), out)
    assert all(handle.token_counts()[name] == (48, 24) for name in BLOCKS)
    tofu.remove(model)
    assert torch.equal(_run(model, inputs), base)


def test_text_stays_mask_and_rotary_rows_follow_and_batch_consistency():
    model = chroma_transformer()
    inputs = _inputs()
    seen = {"double": [], "single": []}
    model.transformer_blocks[0].attn.register_forward_pre_hook(lambda m, a, k: seen["double"].append(k) and None,
                                                               with_kwargs=True)
    model.single_transformer_blocks[0].attn.register_forward_pre_hook(
        lambda m, a, k: seen["single"].append(k) and None, with_kwargs=True)
    full = {}
    model.pos_embed.register_forward_hook(lambda m, a, out: full.update(rotary=out) and None)
    handle = tofu.apply(model, method="tome", ratio=0.5)
    together = _run(model, inputs)
    for kind, name in (("double", BLOCKS[0]), ("single", BLOCKS[1])):
        plan = handle.last_plans()[name][0]
        assert len(seen[kind]) == 2  # once per sample: the rotary table is one for the batch
        for b, kwargs in enumerate(seen[kind]):
            rows = torch.cat([torch.arange(9), 9 + plan.kept_idx[b]])
            for got, table in zip(kwargs["image_rotary_emb"], full["rotary"]):
                assert torch.equal(got, table[rows])
            mask = kwargs["attention_mask"]  # made pairwise by the block
            expected = torch.cat([inputs["attention_mask"][b, :9], torch.ones(24)])
            assert mask.shape[-1] == 9 + 24 and torch.equal(mask[0, 0, 0], expected * expected[0])
            tokens = kwargs["hidden_states"].shape[1]
            assert tokens == (24 if kind == "double" else 9 + 24)
    for i in range(2):
        one = {k: v[i:i + 1] if k in ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask") else v
               for k, v in inputs.items()}
        assert torch.allclose(_run(model, one)[0], together[i], atol=1e-5)


def test_todo_and_sublayers_are_refused_clearly():
    with pytest.raises(ValueError, match="todo is not available for ChromaTransformer2DModel"):
        tofu.apply(chroma_transformer(), method="todo", ratio=0.5)
    with pytest.raises(ValueError, match="merge_scope='block'"):
        tofu.apply(chroma_transformer(), method="tome", ratio=0.5, merge_scope="sublayers")


def _image(pipe):
    return pipe(**chroma_prompt(), height=32, width=48, num_inference_steps=3, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_chroma_pipeline_end_to_end_with_true_cfg():
    pipe = chroma_pipeline()
    base = _image(pipe)
    handle = tofu.apply(pipe, method="tome", schedule=((0.0, 0.5),))
    steps = []
    pipe.transformer.register_forward_hook(lambda *_: steps.append(handle.blocks[0].run.step().index))
    reduced = _image(pipe)
    assert steps == [0, 0, 1, 1, 2, 2]  # the conditional and unconditional calls of a step are one step
    assert reduced.shape == base.shape and torch.isfinite(reduced).all() and not torch.equal(reduced, base)
    assert torch.equal(_image(pipe), reduced)
    tofu.remove(pipe)
    assert torch.equal(_image(pipe), base)
