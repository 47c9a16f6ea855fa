"""The house rules, checked: shared modules name no model family, family files import no other family's file,
no module grows past ~450 lines, the library never imports the evaluation or the bundled pipelines, and
diffusers' private hook internals are what removal relies on."""

import ast
import pathlib
import subprocess
import sys

import pytest
import torch
from diffusers.hooks import HookRegistry

import tofu_diffusion as tofu
from tofu_diffusion.adapters import FAMILIES
from tofu_diffusion.adapters.registry import check_diffusers_internals

PACKAGE = pathlib.Path(tofu.__file__).parent
# Shipped beside the library, above it: they import it, never the other way round.
ABOVE_THE_LIBRARY = ("eval", "pipelines")
FAMILY_WORDS = {"unet", "sd", "sd3", "sdxl", "dit", "pixart", "flux", "flux2", "vit", "deit", "wan", "hunyuan",
                "cogvideo", "cogvideox", "ltx", "qwen", "zimage", "chroma", "kontext"}
FAMILY_FILES = {"unet", "dit", "sd3", "flux", "flux2", "wan", "hunyuan_video", "hunyuan_video15", "cogvideox", "ltx",
                "qwen", "qwen_image", "zimage", "z_image", "chroma", "vit"}


def _modules():
    """The library's own modules (not the evaluation or the bundled pipelines shipped with it)."""
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ABOVE_THE_LIBRARY)


def _imported(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # relative imports resolved to the top of the package: "from ..eval import x" names "eval"
            names.add(("tofu_diffusion." if node.level else "") + (node.module or ""))
    return names


def _is_family(path: pathlib.Path) -> bool:
    rel = path.relative_to(PACKAGE / "adapters") if (PACKAGE / "adapters") in path.parents else None
    return rel is not None and rel.parts[0].removesuffix(".py") in FAMILY_FILES


def _identifiers(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.arg):
            yield node.arg


def test_shared_modules_name_no_family():
    found = {}
    for path in _modules():
        if _is_family(path) or path.name == "presets.py" or path == PACKAGE / "adapters" / "__init__.py":
            continue  # presets are per-family data; the registry lists the families
        for name in _identifiers(ast.parse(path.read_text())):
            words = set(name.lower().split("_"))
            if words & FAMILY_WORDS:
                found.setdefault(str(path.relative_to(PACKAGE)), set()).add(name)
    assert not found, f"shared modules name a family: {found}"


def test_family_files_import_no_other_family():
    for path in _modules():
        if not _is_family(path):
            continue
        own = path.relative_to(PACKAGE / "adapters").parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
                first = node.module.split(".")[0]
                if node.level == 1 and path.parent.name == "adapters" or node.level == 2 and path.parent.name == own:
                    assert first not in FAMILY_FILES - {own}, f"{path.name} imports the {first} family's file"


def test_the_library_never_imports_the_evaluation_or_the_pipelines():
    above = tuple(f"tofu_diffusion.{name}" for name in ABOVE_THE_LIBRARY)
    found = {str(path.relative_to(PACKAGE)): sorted(n for n in _imported(ast.parse(path.read_text()))
                                                  if n.startswith(above) or n.split(".")[0] in ABOVE_THE_LIBRARY)
             for path in _modules()}
    assert not {k: v for k, v in found.items() if v}, f"arrows point down only: {found}"


def test_importing_the_library_loads_neither_the_evaluation_nor_its_plotting():
    # (tqdm and scipy are not asked about: diffusers itself imports them)
    code = ("import sys, tofu_diffusion; print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' "
            "or m.startswith(('tofu_diffusion.eval', 'tofu_diffusion.pipelines'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these by job: {long}"


def test_every_family_is_one_registry_entry():
    families = [adapter.family for adapter in FAMILIES]
    assert len(families) == len(set(families))


def test_the_installed_diffusers_has_the_internals_removal_relies_on():
    check_diffusers_internals()  # raises, naming what changed, on a diffusers that moved them


def test_a_changed_hook_registry_is_reported_loudly(monkeypatch):
    original = HookRegistry.__init__

    def without_fn_refs(self, module_ref):
        original(self, module_ref)
        del self._fn_refs

    monkeypatch.setattr(HookRegistry, "__init__", without_fn_refs)
    with pytest.raises(RuntimeError, match=r"changed its hook registry \(_fn_refs"):
        check_diffusers_internals()


def test_reset_stateful_hooks_forgets_every_caller_state():
    """What a pipeline's maybe_free_model_hooks does at the end of a call: our state is diffusers-stateful,
    so the next call starts a new run, and then gives what a freshly patched model gives."""
    from conftest import DENOISERS, denoiser_inputs, run_denoiser

    model = DENOISERS["dit"]()
    args, kwargs = denoiser_inputs("dit")
    handle = tofu.apply(model, method="tome", schedule=((0.0, 0.5),), plan_reuse_steps=2, schedule_axis="noise")
    first = run_denoiser(model, args, kwargs)
    again = run_denoiser(model, args, {**kwargs, "timestep": kwargs["timestep"] - 100})
    block = handle.blocks[0]
    assert block.run._steps.own() is not None and block._calls.own() is not None
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    assert block.run._steps.own() is None and block._calls.own() is None
    assert torch.equal(run_denoiser(model, args, kwargs), first)
    assert not torch.equal(again, first)
