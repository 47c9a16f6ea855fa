"""Registering our hooks with diffusers' ``HookRegistry`` and taking them out again.

This is the one module that touches the registry's private parts (``_hook_order``, ``_fn_refs``,
``HookFunctionReference.forward`` / ``original_forward``): ``remove_hook`` cannot take a hook out from under
hooks registered after it (accelerate's offload, diffusers' caches), and removal must leave every other hook
working. ``check_diffusers_internals`` says loudly when an installed diffusers changes what this relies on.
"""

from __future__ import annotations

import types

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK_PREFIX = "tofu_diffusion"  # every hook this library registers starts with it

# What removal relies on: the registry's private lists and the function references' attributes.
_REGISTRY_ATTRIBUTES = ("hooks", "_hook_order", "_fn_refs")
_REFERENCE_ATTRIBUTES = ("pre_forward", "post_forward", "forward", "original_forward")


def check_diffusers_internals() -> None:
    """Raise with what changed when the installed diffusers' hook registry is not the one this was written for."""
    import diffusers

    probe = torch.nn.Identity()
    registry = HookRegistry.check_if_exists_or_initialize(probe)
    missing = [a for a in _REGISTRY_ATTRIBUTES if not hasattr(registry, a)]
    if not hasattr(ModelHook, "deinitalize_hook"):
        missing.append("ModelHook.deinitalize_hook")
    if not missing:
        try:
            registry.register_hook(ModelHook(), f"{HOOK_PREFIX}_probe")
            missing += [f"HookFunctionReference.{a}" for a in _REFERENCE_ATTRIBUTES
                        if not hasattr(registry._fn_refs[0], a)]
        except Exception as error:  # any failure here is the message
            missing.append(f"register_hook failed: {error}")
    if missing:
        raise RuntimeError(f"diffusers {diffusers.__version__} changed its hook registry ({', '.join(missing)} "
                           f"missing): tofu-diffusion cannot remove its hooks safely with it; install the diffusers "
                           f"version in tofu-diffusion's requirements")


class HookedForward:
    """A module's ``forward`` while one of our hooks is its outermost: what diffusers installs (pre_forward,
    the inner forward, post_forward), as an object. A function closure would keep pointing at the original
    module's hooks in a ``copy.deepcopy`` of the model; this object is copied with the module, so a copy is
    an independent patched model."""

    def __init__(self, module: torch.nn.Module, fn_ref, wrapped):
        self.module = module
        self.fn_ref = fn_ref
        self.__wrapped__ = wrapped  # inspect.signature follows it to the real signature

    def __call__(self, *args, **kwargs):
        fn_ref = self.fn_ref
        args, kwargs = fn_ref.pre_forward(self.module, *args, **kwargs)
        return fn_ref.post_forward(self.module, fn_ref.forward(*args, **kwargs))


def hooked_forward_class(module_class: type) -> type:
    """``HookedForward`` for modules of ``module_class``, with a ``__call__`` of its own code object.

    torch.compile keeps compiled graphs, and counts recompiles against its limit (8), per code object: one shared
    ``__call__`` would put every hooked block class, with each of its states (reduced, unreduced), in one cache,
    where an unpatched model has one per block class (its own ``forward``). A subclass per class keeps it so. It
    is published in this module under its name, so a patched model pickles."""
    name = f"HookedForward_{module_class.__module__.replace('.', '_')}_{module_class.__qualname__.replace('.', '_')}"
    cls = globals().get(name)
    if cls is None:
        base = HookedForward.__call__
        code = base.__code__.replace(co_name=name)
        call = types.FunctionType(code, base.__globals__, name, base.__defaults__, base.__closure__)
        call.__qualname__ = f"{name}.__call__"
        cls = globals()[name] = type(name, (HookedForward,), {"__call__": call, "__module__": __name__})
    return cls


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    wrapped = module.forward
    registry.register_hook(hook, name)
    hook.installed_forward = hooked_forward_class(type(module))(module, hook.fn_ref, wrapped)
    module.forward = hook.installed_forward
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def _unlink(module: torch.nn.Module, registry: HookRegistry, name: str) -> None:
    """Take one of our hooks out of ``module``'s forward chain, wherever it sits in it.

    ``HookRegistry.remove_hook`` assumes nothing wraps the registry from outside and that the next hook
    has no ``new_forward``; neither holds with accelerate's hooks or diffusers' caches registered after
    ours. Every reference to our installed forward (the module's ``forward``, the next hook's forward,
    accelerate's ``_old_forward``, a wrapper's ``__wrapped__``) is pointed at what ours wrapped instead.
    """
    index = registry._hook_order.index(name)
    fn_ref, hook = registry._fn_refs[index], registry.hooks[name]
    inner = fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward
    installed = getattr(hook, "installed_forward", None)
    for later in registry._fn_refs[index + 1:]:
        for attr in ("forward", "original_forward"):
            if getattr(later, attr) is installed:
                setattr(later, attr, inner)
    for attr, value in list(vars(module).items()):
        if value is installed:
            setattr(module, attr, inner)
    outer = vars(module).get("forward")
    if outer is not None and getattr(outer, "__wrapped__", None) is installed:
        outer.__wrapped__ = inner
    hook.deinitalize_hook(module)
    del registry.hooks[name]
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)


def unregister_all(model: torch.nn.Module) -> None:
    """Remove every tofu-diffusion hook under ``model``, leaving other hooks (diffusers' caches,
    accelerate's offload hooks) in place and working, and drop registries left empty."""
    for module in model.modules():
        registry = vars(module).get("_diffusers_hook")
        if registry is None:
            continue
        for name in [n for n in registry._hook_order if n.startswith(HOOK_PREFIX)]:
            _unlink(module, registry, name)
        if not registry.hooks:
            # Leave the module exactly as constructed: no registry, no instance-level forward.
            del module._diffusers_hook
            forward = vars(module).get("forward")
            if forward is not None and getattr(forward, "__func__", None) is type(module).forward:
                del module.__dict__["forward"]
        elif hasattr(registry, "invalidate_child_registries_cache"):
            registry.invalidate_child_registries_cache()
