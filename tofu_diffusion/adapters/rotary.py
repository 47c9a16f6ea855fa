"""Joint blocks whose attention takes one rotary table for the whole batch.

Plans are per sample, so the kept tokens - and the rotary rows they must carry - differ between samples,
while such an attention (diffusers' ``apply_rotary_emb`` on an (S, D) table) takes one table for the batch.
``PerSampleRotaryBlockHook`` therefore runs a reduced block once per sample, each with the rows of its own
kept tokens (a merged group takes its destination's row): a sample never depends on its batch-mates.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.profiler import record_function

from .hooks import BlockStateHook, Followers, follow, sample_of
from .planning import BlockState

ROTARY_BLOCK_HOOK = "tofu_diffusion_rotary_block"


class PerSampleRotaryBlockHook(BlockStateHook):
    """A joint block returning ``(text, image)`` or ``(image, text)`` (``image_output``: the image's index),
    run on merged image tokens with the rotary rows of the kept ones.

    ``rotary_argument``: the block's rotary ``(cos, sin)`` argument, each (rows before the image + N, D);
    ``rows_before_image(arguments)``: how many of its rows come before the image's (the text's, when the
    table covers [text; image]; 0 when it covers the image alone). Without a rotary table the batch runs
    in one call. ``followers``: other per-token arguments (an attention mask over [image; text]) made to fit
    the plan before the batch is split.
    """

    def __init__(self, state: BlockState, attention: Optional[torch.nn.Module], image_output: int,
                 rotary_argument: str, rows_before_image: Callable[[dict], int],
                 followers: Optional[Followers] = None):
        super().__init__(state)
        self.attention = attention
        self.image_output = image_output
        self.rotary_argument = rotary_argument
        self.rows_before_image = rows_before_image
        self.followers = followers

    def new_forward(self, module, *args, **kwargs):
        bound, extra = self.signature.split(args, kwargs)
        first = self.signature.names[0]
        hidden = bound[first]
        self.state.begin(hidden)
        try:
            plan = self.state.plan(self.attention, None)
            if plan is None:
                return self.fn_ref.original_forward(*args, **kwargs)
            with record_function("tofu_diffusion::merge"):
                merged = plan.merge(hidden, self.state.merge_mode)
            if self.followers:
                _, bound = follow(self.signature, (), bound, self.followers, plan)
            rotary = bound.get(self.rotary_argument)
            if rotary is None:
                call_args, call_kwargs = self.signature.join({**bound, first: merged}, extra)
                outputs = [self.fn_ref.original_forward(*call_args, **call_kwargs)]
            else:
                outputs = self._per_sample(bound, extra, first, merged, rotary, plan)
            images = torch.cat([out[self.image_output] for out in outputs])
            texts = torch.cat([out[1 - self.image_output] for out in outputs])
            with record_function("tofu_diffusion::unmerge"):
                image = hidden + plan.unmerge(images - merged)
            return (texts, image) if self.image_output == 1 else (image, texts)
        finally:
            self.state.end()

    def _per_sample(self, bound: dict, extra: tuple, first: str, merged: torch.Tensor, rotary, plan) -> list:
        batch, offset = merged.shape[0], self.rows_before_image(bound)
        before = torch.arange(offset, device=plan.kept_idx.device)
        outputs = []
        for b in range(batch):
            one = {name: sample_of(value, b, batch) for name, value in bound.items()}
            one[first] = merged[b:b + 1]
            rows = torch.cat([before, offset + plan.kept_idx[b]])
            one[self.rotary_argument] = tuple(r.index_select(0, rows.to(r.device)) for r in rotary)
            call_args, call_kwargs = self.signature.join(one, tuple(sample_of(v, b, batch) for v in extra))
            outputs.append(self.fn_ref.original_forward(*call_args, **call_kwargs))
        return outputs
