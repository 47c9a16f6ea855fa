"""Bad input gets a clear error naming the problem and the fix."""

import pytest
import torch

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import sd_pipeline, sd_unet


@pytest.mark.parametrize(
    "options,message",
    [
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio must be in \[0, 1\)"),
        ({"method": "tomesd"}, r"unknown method 'tomesd'; choose one of \('tome', 'tofu', 'mctf', 'todo'\)"),
        ({"merge_mode": "max"}, r"unknown merge_mode 'max'"),
        ({"tau_info": -1.0}, r"tau_info must be >= 0"),
        ({"destination": "center"}, r"unknown destination 'center'"),
        ({"stride": (0, 2)}, r"stride must be two positive ints"),
        ({"max_downsample": 0}, r"max_downsample must be >= 1"),
        ({"levels": []}, r"levels must be a non-empty list"),
        ({"merge_self_attention": False, "merge_scope": "sublayers"}, r"nothing to reduce"),
        ({"merge_scope": "model"}, r"unknown merge_scope 'model'"),
    ],
)
def test_config_errors(options, message):
    with pytest.raises(ValueError, match=message):
        tofu.TokenFusionConfig(**options)


@pytest.mark.parametrize("options", [{"ratio": 0.8}, {"schedule": [(0.0, 0.0), (0.5, 0.8)]}])
def test_a_ratio_past_the_strides_cap_is_refused_on_a_denoiser(options):
    with pytest.raises(ValueError, match=r"caps it at 0.750.*stride=\(4, 4\)"):
        tofu.apply(sd_unet(), method="tome", **options)


@pytest.mark.parametrize("options,message", [
    ({"stride": (2.5, 2)}, r"stride must be two positive ints .* got 2.5"),
    ({"seed": "zero"}, r"seed must be an int, got 'zero'"),
    ({"seed": 1.5}, r"seed must be an int, got 1.5"),
    ({"max_downsample": 2.5}, r"max_downsample must be an int"),
    ({"blocks": [0.5]}, r"blocks must be a list of block indices \(ints\) or a slice"),
    ({"layers": [1.5]}, r"layers must be a list of layer indices"),
    ({"levels": "1"}, r"levels must be a list of downsampling factors"),
    ({"tau_info": "x"}, r"tau_info must be a number"),
    ({"plan_reuse_steps": 1.5}, r"plan_reuse_steps must be an int"),
    ({"merge_self_attention": "yes"}, r"merge_self_attention must be True or False"),
    ({"r": 8.0}, r"r must be an int >= 0"),
    ({"r": [2, 2.5]}, r"r must be an int >= 0"),
])
def test_options_of_the_wrong_type_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        tofu.TokenFusionConfig(**options)


def test_numpy_and_torch_integers_are_taken_as_ints():
    import numpy as np

    config = tofu.TokenFusionConfig(stride=np.int64(4), seed=np.int32(3), r=torch.tensor(4), blocks=[np.int64(1)])
    assert (config.stride, config.seed, config.r, config.blocks) == ((4, 4), 3, 4, (1,))
    assert all(type(v) is int for v in (*config.stride, config.seed, config.r, *config.blocks))


def test_larger_stride_allows_higher_ratio():
    assert tofu.TokenFusionConfig(ratio=0.9, stride=4).stride == (4, 4)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"unknown TokenFusionConfig option\(s\) \['rate'\]"):
        tofu.apply(sd_unet(), rate=0.5)


def test_unsupported_model_names_what_it_found():
    from diffusers import AuraFlowTransformer2DModel

    model = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                       num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
                                       pos_embed_max_size=16)
    with pytest.raises(TypeError, match=r"cannot patch AuraFlowTransformer2DModel.*AuraFlowJointTransformerBlock x1, "
                                        r"AuraFlowSingleTransformerBlock x1"):
        tofu.apply(model)
    assert not hasattr(model, "_diffusers_hook")  # nothing was half-applied
    with pytest.raises(TypeError, match="cannot patch Linear"):
        tofu.apply(torch.nn.Linear(2, 2))


def test_pipeline_without_denoiser_is_named():
    class NotAPipeline:
        components = {"vae": torch.nn.Identity()}

    message = r"no.*`unet` or\s+`transformer`.*vae=Identity|`unet` or `transformer` component.*vae=Identity"
    with pytest.raises(TypeError, match=message):
        tofu.apply(NotAPipeline())


def test_remove_without_apply_is_an_error():
    with pytest.raises(ValueError, match="not applied"):
        tofu.remove(sd_pipeline())


def test_grid_smaller_than_stride_at_runtime():
    model = sd_unet()
    tofu.apply(model, ratio=0.5, max_downsample=2)
    # a 2x16 latent gives a 1x8 strip at the 1/2 level: no 2x2 cell fits in it
    x = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="smaller than the 2x2 merge stride"):
        model(x, 1, torch.randn(1, 7, 32))
    tofu.remove(model)


def test_rejected_apply_keeps_the_current_patch_and_stale_handles_are_refused():
    from tofu_diffusion.pipelines.tiny import dit_transformer

    model = dit_transformer()
    first = tofu.apply(model, method="tome", ratio=0.5)
    with pytest.raises(ValueError, match="out of range"):
        tofu.apply(model, ratio=0.5, blocks=[9])
    assert tofu.handle_of(model) is first  # the rejected call left the patch alone
    second = tofu.apply(model, method="tofu", ratio=0.25)
    with pytest.raises(ValueError, match="this handle is stale"):
        first.remove()
    assert tofu.handle_of(model) is second
    second.remove()
    assert tofu.handle_of(model) is None


def test_nothing_to_reduce_is_said():
    from tofu_diffusion.pipelines.tiny import dit_transformer

    model = dit_transformer()
    with pytest.raises(ValueError, match="exist in none of DiTTransformer2DModel's blocks"):
        tofu.apply(model, ratio=0.5, merge_scope="sublayers", merge_self_attention=False,
                   merge_cross_attention=True)
    assert tofu.handle_of(model) is None


def test_a_ratio_that_removes_no_token_warns_once(caplog):
    import torch

    from tofu_diffusion.pipelines.tiny import dit_transformer

    model = dit_transformer()  # 64 tokens per block: ratio 0.01 removes none
    x = torch.randn(1, 4, 16, 16)
    with caplog.at_level("WARNING", logger="tofu_diffusion"), tofu.fused(model, ratio=0.01):
        model(x, timestep=torch.tensor([10]), class_labels=torch.tensor([1]))
        model(x, timestep=torch.tensor([10]), class_labels=torch.tensor([1]))
    assert caplog.text.count("removes no token") == 1


@pytest.mark.parametrize("positional", [0.5, "tome"])
def test_a_positional_ratio_or_method_is_refused_with_the_keyword_form(positional):
    from tofu_diffusion.pipelines.tiny import dit_transformer

    model = dit_transformer()
    with pytest.raises(TypeError, match=r"pass options by keyword, e.g. apply\(model, ratio=0.5\)"):
        tofu.apply(model, positional)
    assert tofu.handle_of(model) is None


@pytest.mark.parametrize("options,message", [
    ({"levels": [1]}, "levels is an option of diffusion denoisers"),
    ({"merge_scope": "sublayers", "stride": (4, 4)}, "stride, merge_scope are options of diffusion denoisers"),
    ({"plan_reuse_steps": 2}, "plan_reuse_steps is an option of diffusion denoisers"),
    ({"unmerge_mode": "cached"}, "unmerge_mode is an option of diffusion denoisers"),
    ({"unmerge_cache_gb": 4}, "unmerge_cache_gb is an option of diffusion denoisers"),
])
def test_diffusion_options_on_a_classifier_are_refused_before_the_patch_is_touched(options, message):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64, num_labels=6)).eval()
    handle = tofu.apply(model, method="tome", r=2)
    with pytest.raises(ValueError, match=message):
        tofu.apply(model, method="tome", r=2, **options)
    assert tofu.handle_of(model) is handle  # still the previous patch


@pytest.mark.parametrize("options,message", [
    ({"token_order": "original"}, "token_order is an option of ViT/DeiT classifiers"),
    ({"proportional_attention": False}, "proportional_attention is an option of ViT/DeiT classifiers"),
])
def test_classifier_options_on_a_denoiser_are_refused(options, message):
    from tofu_diffusion.pipelines.tiny import dit_transformer

    with pytest.raises(ValueError, match=message):
        tofu.apply(dit_transformer(), method="tome", ratio=0.5, **options)
