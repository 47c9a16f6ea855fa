"""Ready pipelines and the bundled small models.

The embedded models (trained on the procedural shapes by ``python -m tofu_diffusion.pipelines.train_shapes``; weights
in ``tofu_diffusion/pipelines/weights``):

- ``tiny-unet``: ``ShapesUNetPipeline``, an SD-style ``UNet2DConditionModel`` with cross-attention on
  learned class tokens;
- ``tiny-dit``: ``ShapesDiTPipeline``, a class-conditional ``DiTTransformer2DModel``, patch 2;
- ``tiny-mmdit``: ``ShapesMMDiTPipeline``, an ``SD3Transformer2DModel`` (joint attention) on
  learned class tokens and a pooled class vector;
- ``tiny-unet-64``: tiny-unet's layout at 64 px, 1,024 tokens at its top attention level (the real token
  counts' stand-in: SD1.5 at 512 px has 4,096);
- ``shapes-classifier``: the CNN whose features score FID and whose predictions score class accuracy.
"""

from __future__ import annotations

import json
import os

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
EMBEDDED_GENERATORS = ("tiny-unet", "tiny-dit", "tiny-mmdit", "tiny-unet-64")


def embedded_path(name: str) -> str:
    """The folder of a bundled model: a generator (``EMBEDDED_GENERATORS``), ``shapes-classifier`` or ``tiny-vit``."""
    path = os.path.join(WEIGHTS_DIR, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"bundled model {name!r} not found at {path}; train it with "
                                f"`python -m tofu_diffusion.pipelines.train_shapes` (see its --help)")
    return path


def shapes_pipeline_class(name_or_path: str):
    """The shapes pipeline class of a bundled name or of a folder saved from one; None for anything else."""
    from .shapes_pipeline import ShapesDiTPipeline, ShapesMMDiTPipeline, ShapesUNetPipeline, ShapesWanPipeline

    classes = {"tiny-unet": ShapesUNetPipeline, "tiny-dit": ShapesDiTPipeline, "tiny-mmdit": ShapesMMDiTPipeline,
               "tiny-unet-64": ShapesUNetPipeline}
    if name_or_path in classes:
        return classes[name_or_path]
    index = os.path.join(name_or_path, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            class_name = json.load(f).get("_class_name")
        # tiny-wan is trained but not shipped yet: a folder saved from it loads all the same
        saved = (ShapesUNetPipeline, ShapesDiTPipeline, ShapesMMDiTPipeline, ShapesWanPipeline)
        return {c.__name__: c for c in saved}.get(class_name)
    return None


def load_embedded(name_or_path: str):
    """A bundled generator by name (``EMBEDDED_GENERATORS``) or a folder saved from one, via ``from_pretrained``.

    The shapes pipelines are this project's classes, so diffusers' generic ``DiffusionPipeline`` cannot
    resolve them: they load through their own class.
    """
    cls = shapes_pipeline_class(name_or_path)
    if cls is None:
        raise ValueError(f"{name_or_path!r} is neither a bundled model ({', '.join(EMBEDDED_GENERATORS)}) nor a "
                         "folder saved from a shapes pipeline")
    import torch

    path = embedded_path(name_or_path) if name_or_path in EMBEDDED_GENERATORS else name_or_path
    return cls.from_pretrained(path, dtype=torch.float32)  # the bundled weights are stored in float16


def load_shapes_classifier():
    from .classifier import load_classifier

    return load_classifier(embedded_path("shapes-classifier"))
