"""Token-reduction-consistency fine-tuning (MCTF): train a classifier to keep its answer when reduced.

Each step runs the shared model twice: a teacher pass with a small random ``r`` and a student pass
with the target ``r``. The loss is the cross-entropy of both plus ``weight`` times the MSE between
their final-norm CLS tokens, the teacher's detached, counted only for images whose student probability
of the true class is above ``threshold``::

    for images, labels in loader:
        loss, parts = consistency_loss(model, images, labels, TokenFusionConfig(method="mctf", r=16))
        loss.backward()            # or accelerator.backward(loss)
        optimizer.step(); optimizer.zero_grad()

With accelerate, pass the unwrapped model (``accelerator.unwrap_model(model)``) or the prepared one:
the hooks go on the module that owns the layers either way, and the backward pass is the usual one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from .api import fused
from .config import TokenFusionConfig


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    from .adapters.vit import backbone_of

    backbone = backbone_of(model)
    if backbone is None or not hasattr(backbone, "layernorm"):
        raise TypeError(f"{type(model).__name__} is not a ViT/DeiT classifier with a final layernorm")
    return backbone.layernorm


def _logits_and_cls(model: torch.nn.Module, inner: torch.nn.Module, images: torch.Tensor) -> tuple:
    captured = {}
    handle = _final_norm(inner).register_forward_hook(lambda m, i, out: captured.__setitem__("cls", out[:, 0]))
    try:
        output = model(images)
    finally:
        handle.remove()
    logits = output.logits if hasattr(output, "logits") else output
    return logits, captured["cls"]


def consistency_loss(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    student: TokenFusionConfig,
    teacher_max_r: int = 8,
    weight: float = 3.0,
    threshold: float = 0.4,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, dict]:
    """MCTF's consistency objective for one batch. Returns the loss and its parts (floats).

    ``student`` is the reduction being trained for (its ``r``, or ``ratio``); the teacher uses the same
    method with ``r`` drawn uniformly from ``[0, teacher_max_r)`` (``generator`` makes it repeatable).
    """
    if student.r is None and student.ratio == 0:
        raise ValueError("the student config reduces nothing: give it r (tokens per layer) or a ratio > 0")
    if teacher_max_r < 1:
        raise ValueError(f"teacher_max_r must be >= 1 (the teacher's r is drawn from [0, teacher_max_r)), "
                         f"got {teacher_max_r}")
    inner = _unwrap(model)
    teacher_r = int(torch.randint(teacher_max_r, (1,), generator=generator))
    teacher = dataclasses.replace(student, r=teacher_r)
    with fused(inner, teacher):
        teacher_logits, teacher_cls = _logits_and_cls(model, inner, images)
    with fused(inner, student):
        student_logits, student_cls = _logits_and_cls(model, inner, images)
    ce_teacher = F.cross_entropy(teacher_logits, labels)
    ce_student = F.cross_entropy(student_logits, labels)
    confident = student_logits.detach().softmax(dim=-1).gather(1, labels[:, None]).squeeze(1) > threshold
    per_image = (student_cls - teacher_cls.detach()).pow(2).mean(dim=-1)
    mse = (per_image * confident).sum() / confident.sum().clamp_min(1)
    loss = ce_student + ce_teacher + weight * mse
    parts = {"ce_student": ce_student.item(), "ce_teacher": ce_teacher.item(), "mse": mse.item(),
             "teacher_r": teacher_r, "confident": int(confident.sum())}
    return loss, parts
