"""Reliability: token fusion composes with other hooks and survives checkpointing, copies, threads,
torch.compile, offload and exceptions; remove() always gives back exactly the original model."""

import copy
import threading

import pytest
import torch
from conftest import denoiser_inputs, run_denoiser
from diffusers import hooks as diffusers_hooks
from diffusers.hooks import HookRegistry

import tofu_diffusion as tofu
from tofu_diffusion.pipelines.tiny import dit_transformer, pixart_transformer, prompt_embeds, sd_pipeline, sd_unet


def _at(kind, t, h=16, w=16):
    args, kwargs = denoiser_inputs(kind, h=h, w=w)
    if kind in ("dit", "pixart"):
        kwargs = {**kwargs, "timestep": torch.tensor([t] * args[0].shape[0])}
    else:
        args = (args[0], torch.tensor([t] * args[0].shape[0])) + tuple(args[2:])
    return args, kwargs


def _no_trace_left(model):
    return not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())


# ------------------------------------------------------------------ 1. other hooks on top
def test_remove_keeps_accelerate_hooks_registered_on_top():
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    class Count(AccelerateHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = dit_transformer()
    args, kwargs = denoiser_inputs("dit")
    base = run_denoiser(model, args, kwargs)
    tofu.apply(model, method="tome", ratio=0.5)
    block = model.transformer_blocks[1]
    add_hook_to_module(block, Count())
    add_hook_to_module(model, Count())
    reduced = run_denoiser(model, args, kwargs)
    assert Count.calls == 2 and not torch.equal(reduced, base)
    tofu.remove(model)
    assert torch.equal(run_denoiser(model, args, kwargs), base)
    assert Count.calls == 4  # both accelerate hooks still run
    # no stale token-fusion hook left under accelerate's: another grid size runs unreduced
    other_args, other_kwargs = denoiser_inputs("dit", h=24, w=24)
    run_denoiser(model, other_args, other_kwargs)
    assert Count.calls == 6
    remove_hook_from_module(block)
    remove_hook_from_module(model)
    assert torch.equal(run_denoiser(model, args, kwargs), base)


def test_accelerate_hook_below_token_fusion_stays():
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module

    class Double(AccelerateHook):
        def post_forward(self, module, output):
            return output * 2

    model = dit_transformer()
    args, kwargs = denoiser_inputs("dit")
    add_hook_to_module(model.transformer_blocks[0], Double())
    doubled = run_denoiser(model, args, kwargs)
    tofu.apply(model, method="tome", ratio=0.5)
    assert not torch.equal(run_denoiser(model, args, kwargs), doubled)
    tofu.remove(model)
    assert torch.equal(run_denoiser(model, args, kwargs), doubled)


CACHES = {
    "first_block_cache": lambda: diffusers_hooks.FirstBlockCacheConfig(threshold=0.5),
    "pyramid_attention_broadcast": lambda: diffusers_hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: _NOW["t"]),
    "faster_cache": lambda: diffusers_hooks.FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: _NOW["t"], attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=True),
    "taylorseer_cache": lambda: diffusers_hooks.TaylorSeerCacheConfig(cache_interval=2),
    "mag_cache": lambda: diffusers_hooks.MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4),
}
CACHES = {name: make for name, make in CACHES.items() if hasattr(diffusers_hooks, f"apply_{name}")}
_NOW = {"t": 900}
_STEPS = (900, 700, 500, 300)


def _with_cache(model, name):
    getattr(diffusers_hooks, f"apply_{name}")(model, CACHES[name]())


def _remove_cache(model):
    """What diffusers' ``disable_cache`` does: remove every hook that is not token fusion's."""
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        for name in [] if registry is None else list(registry._hook_order):
            if not name.startswith("tofu_diffusion"):
                registry.remove_hook(name, recurse=False)


def _denoise(model, kind):
    """A four-step loop in a cache context, with fresh cache state."""
    if any(hasattr(m, "_diffusers_hook") for m in model.modules()):
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.reset_stateful_hooks()
        diffusers_hooks.hooks._set_cache_context(model, diffusers_hooks.hooks.CacheContext("cond"))
    outputs = []
    for t in _STEPS:
        _NOW["t"] = t
        args, kwargs = _at(kind, t)
        outputs.append(run_denoiser(model, args, kwargs))
    return torch.stack(outputs)


@pytest.mark.slow
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("order", ["cache_first", "tofu_first"])
def test_diffusers_caches_compose_and_each_removes_exactly(cache, order):
    kind = "dit"
    base = _denoise(dit_transformer(), kind)
    cache_only = dit_transformer()
    _with_cache(cache_only, cache)
    cache_only = _denoise(cache_only, kind)
    tofu_model = dit_transformer()
    tofu.apply(tofu_model, method="tome", ratio=0.5)
    tofu_only = _denoise(tofu_model, kind)

    for removed_first in ("tofu", "cache"):
        model = dit_transformer()
        if order == "cache_first":
            _with_cache(model, cache)
            handle = tofu.apply(model, method="tome", ratio=0.5)
        else:
            handle = tofu.apply(model, method="tome", ratio=0.5)
            _with_cache(model, cache)
        both = _denoise(model, kind)
        assert torch.isfinite(both).all()
        assert any(n_out < n_in for n_in, n_out in handle.token_counts().values())
        if removed_first == "tofu":
            tofu.remove(model)
            assert torch.equal(_denoise(model, kind), cache_only)  # the cache is still there and working
            _remove_cache(model)
        else:
            _remove_cache(model)
            assert torch.equal(_denoise(model, kind), tofu_only)  # token fusion is still there and working
            tofu.remove(model)
        assert torch.equal(_denoise(model, kind), base)


# ------------------------------------------------------------------ 2. gradient checkpointing
def _grads(model, kind):
    args, kwargs = denoiser_inputs(kind)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        run_denoiser(model, args, kwargs).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_gradient_checkpointing_recomputes_the_same_plan(method):
    model = dit_transformer()
    tofu.apply(model, method=method, ratio=0.5)
    plain = _grads(model, "dit")
    model.enable_gradient_checkpointing()
    checkpointed = _grads(model, "dit")
    assert torch.allclose(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_a_thread_that_started_no_call_sees_the_latest_step():
    """Autograd's backward threads (GPU) recompute checkpointed blocks: they must see the forward's step."""
    model = dit_transformer()
    handle = tofu.apply(model, method="tome", ratio=0.5)
    args, kwargs = _at("dit", 321)
    run_denoiser(model, args, kwargs)
    run = handle.blocks[0].run
    seen = {}
    worker = threading.Thread(target=lambda: seen.update(key=run.step().key))
    worker.start()
    worker.join()
    assert torch.equal(seen["key"], run.step().key)


# ------------------------------------------------------------------ 3. copies
@pytest.mark.parametrize("method", ["tome", "todo"])
def test_deepcopy_is_an_independent_patched_model(method):
    original = dit_transformer()
    unpatched_twin = copy.deepcopy(original)
    args, kwargs = denoiser_inputs("dit")
    tofu.apply(original, method=method, ratio=0.5)
    reduced = run_denoiser(original, args, kwargs)
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for model in (twin, unpatched_twin):
            for p in model.parameters():
                p.mul_(1.01)
    tofu.apply(unpatched_twin, method=method, ratio=0.5)
    # the copy runs its own weights, reduced like a model patched on its own
    assert torch.equal(run_denoiser(twin, args, kwargs), run_denoiser(unpatched_twin, args, kwargs))
    assert torch.equal(run_denoiser(original, args, kwargs), reduced)
    assert tofu.handle_of(twin).model is twin
    tofu.remove(twin)
    assert _no_trace_left(twin)
    assert torch.equal(run_denoiser(original, args, kwargs), reduced)  # the original keeps its patch
    tofu.remove(original)
    assert _no_trace_left(original)


# ------------------------------------------------------------------ 7. threads
def _in_threads(work, count):
    """Run ``work(k)`` for k in range(count), each in its own thread, all at once."""
    threads = [threading.Thread(target=work, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.mark.slow
def test_concurrent_calls_from_threads_get_their_own_plans():
    model = dit_transformer()
    tofu.apply(model, method="mctf", ratio=0.5)
    jobs = [(t, size) for t in (900, 600, 300) for size in (16, 24)]
    expected = {job: run_denoiser(model, *_at("dit", job[0], job[1], job[1])) for job in jobs}
    wrong, errors = [], []

    def work(offset):
        try:
            for i in range(12):
                job = jobs[(i + offset) % len(jobs)]
                if not torch.equal(run_denoiser(model, *_at("dit", job[0], job[1], job[1])), expected[job]):
                    wrong.append(job)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    _in_threads(work, 3)
    assert not errors and not wrong


def _live_tensors() -> int:
    import gc

    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_state_of_finished_threads_is_not_kept(method):
    """A server handling each request on its own thread: once the threads end, none of their state stays."""
    model = dit_transformer()
    tofu.apply(model, method=method, ratio=0.5, plan_reuse_steps=2)
    run_denoiser(model, *_at("dit", 500))
    _in_threads(lambda k: run_denoiser(model, *_at("dit", 900 - 10 * k)), 4)  # the "latest" values of some thread
    before = _live_tensors()
    _in_threads(lambda k: run_denoiser(model, *_at("dit", 800 - 10 * k)), 48)
    # every block's plan and input of 48 finished threads would be well over a thousand tensors
    assert _live_tensors() - before < 60
    tofu.remove(model)


# ------------------------------------------------------------------ 9. torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("method, scope", [("tome", "block"), ("mctf", "sublayers")])
def test_compiles_fullgraph_and_matches_eager(method, scope):
    torch._dynamo.reset()
    model = dit_transformer()
    args, kwargs = denoiser_inputs("dit")
    with tofu.fused(model, method=method, ratio=0.5, merge_scope=scope):
        eager = run_denoiser(model, args, kwargs)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(*args, **kwargs, return_dict=False)[0], eager)
    torch._dynamo.reset()


def test_compiled_bare_model_with_a_schedule_and_no_scheduler_says_why():
    torch._dynamo.reset()
    model = dit_transformer()
    args, kwargs = denoiser_inputs("dit")
    with tofu.fused(model, method="tome", schedule=((0.0, 0.0), (0.4, 0.5))):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with pytest.raises(Exception, match="has no scheduler to follow"):
            compiled(*args, **kwargs)
    torch._dynamo.reset()


# ------------------------------------------------------------------ offload, meta, exceptions
def _sd_call():
    return dict(prompt_embeds=prompt_embeds(), negative_prompt_embeds=prompt_embeds(seed=2), num_inference_steps=2,
                height=32, width=32, output_type="pt")


@pytest.mark.slow
def test_model_cpu_offload_pipeline_keeps_its_hooks():
    pipe = sd_pipeline(sd_unet())
    base = pipe(**_sd_call(), generator=torch.Generator().manual_seed(0)).images
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(pipe(**_sd_call(), generator=torch.Generator().manual_seed(0)).images, base)
    unet = pipe.unet

    def accelerate_hooks():  # model offload re-installs its hooks after every call: compare their kinds
        return {name: type(m._hf_hook) for name, m in unet.named_modules() if hasattr(m, "_hf_hook")}

    offload_hooks = accelerate_hooks()
    assert offload_hooks
    with tofu.fused(pipe, method="tome", ratio=0.5) as handle:
        reduced = pipe(**_sd_call(), generator=torch.Generator().manual_seed(0)).images
        assert any(n_out < n_in for n_in, n_out in handle.token_counts().values())
    assert accelerate_hooks() == offload_hooks
    assert not torch.allclose(reduced, base, atol=1e-4)
    assert torch.equal(pipe(**_sd_call(), generator=torch.Generator().manual_seed(0)).images, base)


def test_sequential_cpu_offload_bookkeeping():
    """Sequential offload moves every leaf at call time (not runnable without an accelerator here): token
    fusion goes on and comes off around accelerate's hooks and leaves each of them as it was."""
    from tofu_diffusion.adapters.registry import HookedForward

    pipe = sd_pipeline(sd_unet())
    pipe.enable_sequential_cpu_offload(device="cpu")
    unet = pipe.unet
    before = {name: (m._hf_hook, m._old_forward) for name, m in unet.named_modules() if hasattr(m, "_hf_hook")}
    assert before
    handle = tofu.apply(pipe, method="mctf", ratio=0.5, merge_scope="sublayers")
    assert handle.blocks and all(hasattr(m, "_hf_hook") for name, m in unet.named_modules() if name in before)
    tofu.remove(pipe)
    after = {name: (m._hf_hook, m._old_forward) for name, m in unet.named_modules() if hasattr(m, "_hf_hook")}
    assert after == before
    assert not any(isinstance(v, HookedForward) for m in unet.modules() for v in vars(m).values())
    assert not any(hasattr(m, "_diffusers_hook") for m in unet.modules())


def test_apply_on_the_meta_device_touches_no_data():
    with torch.device("meta"):
        model = pixart_transformer()
    handle = tofu.apply(model, method="mctf", ratio=0.5)
    assert all(p.is_meta for p in model.parameters())
    assert handle.blocks
    tofu.remove(model)
    assert _no_trace_left(model)


@pytest.mark.slow
def test_an_exception_mid_generation_leaves_the_model_restorable():
    pipe = sd_pipeline(sd_unet())
    model = pipe.unet
    call = dict(prompt_embeds=prompt_embeds(), negative_prompt_embeds=prompt_embeds(seed=2), num_inference_steps=3,
                height=32, width=32, output_type="pt")
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images

    def fail(pipeline, step, timestep, kwargs):
        if step == 1:
            raise KeyboardInterrupt("stop")
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        with tofu.fused(pipe, method="tome", ratio=0.5):
            pipe(**call, generator=torch.Generator().manual_seed(0), callback_on_step_end=fail)
    assert tofu.handle_of(pipe) is None and _no_trace_left(model)
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, base)
    # an exception inside a reduced block's forward: the next call and remove() are unaffected by it
    tofu.apply(pipe, method="tome", ratio=0.5)
    reduced = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    block = next(m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock")
    injected = block.ff.register_forward_pre_hook(_raise_once())
    with pytest.raises(RuntimeError, match="injected"):
        pipe(**call, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, reduced)
    tofu.remove(pipe)
    injected.remove()
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, base)
    assert _no_trace_left(model)


def _raise_once():
    fired = []

    def hook(module, args):
        if not fired:
            fired.append(True)
            raise RuntimeError("injected")

    return hook


# ------------------------------------------------------------------ classifiers: 2, 3, 7, 8
def _vit(**overrides):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, num_labels=6, **overrides)
    return ViTForImageClassification(ViTConfig(**config)).eval()


def _pixels(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_vit_gradient_checkpointing_gives_the_same_gradients(method):
    model = _vit()
    tofu.apply(model, method=method, r=8)
    x = _pixels()

    def grads():
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(x).logits.square().sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model.train()  # transformers checkpoints layers in training mode (the dropouts are 0)
    plain = grads()
    model.gradient_checkpointing_enable()
    assert torch.allclose(grads(), plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", tofu.CLASSIFIER_METHODS)
def test_vit_at_another_image_size_with_interpolated_positions(method):
    model = _vit()
    x = _pixels(size=48)  # 144 patches instead of 64
    base = model(x, interpolate_pos_encoding=True).logits
    with tofu.fused(model, method=method, r=0):
        assert torch.equal(model(x, interpolate_pos_encoding=True).logits, base)
    handle = tofu.apply(model, method=method, ratio=0.25)
    out = model(x, interpolate_pos_encoding=True).logits
    assert out.shape == base.shape and not torch.equal(out, base)
    n, expected = 145, []
    for _ in range(4):
        expected.append((n, n - int(0.25 * n)))
        n -= int(0.25 * n)
    assert [handle.token_counts()[f"layers.{i}"] for i in range(4)] == expected
    assert handle.schedule == [a - b for a, b in expected]
    model(_pixels())  # and back at the native size
    assert handle.token_counts()["layers.0"] == (65, 65 - int(0.25 * 65))
    tofu.remove(model)


def test_vit_deepcopy_is_independent():
    original = _vit()
    twin_unpatched = copy.deepcopy(original)
    tofu.apply(original, method="mctf", r=8)
    x = _pixels()
    reduced = original(x).logits
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for model in (twin, twin_unpatched):
            for p in model.parameters():
                p.mul_(1.01)
    tofu.apply(twin_unpatched, method="mctf", r=8)
    assert torch.equal(twin(x).logits, twin_unpatched(x).logits)
    tofu.remove(twin)
    tofu.remove(twin_unpatched)
    assert torch.equal(twin(x).logits, twin_unpatched(x).logits)
    assert twin.config._attn_implementation == twin_unpatched.config._attn_implementation
    assert torch.equal(original(x).logits, reduced)  # the original keeps its patch


@pytest.mark.slow
def test_vit_threads_share_one_patched_model():
    model = _vit()
    tofu.apply(model, method="mctf", ratio=0.25)
    inputs = [(_pixels(seed=s, size=size), size != 32) for s in range(2) for size in (32, 48)]
    expected = [model(x, interpolate_pos_encoding=interp).logits for x, interp in inputs]
    wrong = []

    def work(offset):
        for i in range(10):
            k = (i + offset) % len(inputs)
            x, interp = inputs[k]
            if not torch.equal(model(x, interpolate_pos_encoding=interp).logits, expected[k]):
                wrong.append(k)

    _in_threads(work, 3)
    assert not wrong


def test_handles_stay_live_through_scoped_fused_blocks_and_keep_their_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = dit_transformer()
    args, kwargs = denoiser_inputs("dit")
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    outer = tofu.apply(model, method="tome", ratio=0.5, scheduler=scheduler)
    with tofu.fused(model, method="mctf", ratio=0.25) as middle:
        with tofu.fused(model, method="tofu", ratio=0.75):
            pass
        assert tofu.handle_of(model) is middle  # the nested block gave back the middle handle itself
        run_denoiser(model, args, kwargs)
        assert middle.token_counts()[middle.blocks[0].name] == (64, 48)
    assert tofu.handle_of(model) is outer and outer.config.method == "tome"
    assert outer.blocks[0].run.locator.scheduler is scheduler  # re-applied with the scheduler it was given
    run_denoiser(model, args, kwargs)
    assert outer.token_counts()[outer.blocks[0].name] == (64, 32)  # follows the calls after the blocks
    outer.remove()
    assert tofu.handle_of(model) is None


def test_a_pixart_attention_mask_over_the_latent_follows_the_kept_tokens_in_block_scope():
    model = pixart_transformer()
    args, kwargs = denoiser_inputs("pixart")
    mask = torch.ones(2, 64)
    mask[0, 40:] = 0  # the first sample's last 24 tokens are not attended to
    masked = {**kwargs, "attention_mask": mask}
    base = run_denoiser(model, args, masked)
    with tofu.fused(model, method="tome", ratio=0.0, merge_scope="block"):
        assert torch.equal(run_denoiser(model, args, masked), base)
    with tofu.fused(model, method="tome", ratio=0.5, merge_scope="block"):
        out = run_denoiser(model, args, masked)
        unmasked = run_denoiser(model, args, kwargs)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.allclose(out[0], unmasked[0])  # the mask still acts on the reduced keys
    assert torch.allclose(out[1], unmasked[1])  # and a sample it masks nothing of is as without it
    with tofu.fused(model, method="tome", ratio=0.5, merge_scope="sublayers"):
        with pytest.raises(ValueError, match="attention_mask, which token fusion cannot merge"):
            run_denoiser(model, args, masked)


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_a_patched_classifier_runs_on_the_meta_device(method):
    """Shape-only runs (the meta device) need matching without a count from the device: the protected
    tokens' number is known on the host."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    config = DeiTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, num_labels=6)
    with torch.device("meta"):
        model = DeiTForImageClassificationWithTeacher(config)
    handle = tofu.apply(model, method=method, r=4)
    logits = model(torch.zeros(2, 3, 32, 32, device="meta")).logits
    assert logits.device.type == "meta" and logits.shape == (2, 6)
    assert handle.schedule == [4, 4, 4]
