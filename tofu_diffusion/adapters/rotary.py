"""Joint blocks whose attention takes one rotary table for the whole batch.

Plans are per sample, so the kept tokens - and the rotary rows they must carry - differ between samples,
while such an attention (diffusers' ``apply_rotary_emb`` on an (S, D) table) takes one table for the batch.
``PerSampleRotaryBlockHook`` therefore runs a reduced block once per sample, each with the rows of its own
kept tokens (a merged group takes its destination's row): a sample never depends on its batch-mates.
"""

from __future__ import annotations

import math
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
    table covers [text; image]; 0 when it covers the image alone; a joint sequence's text, by itself).
    Without a rotary table the batch runs in one call. ``followers``: other per-token arguments (an
    attention mask over [image; text]) made to fit the plan before the batch is split.
    ``sample(name, value, index, batch)``: argument ``name``'s part for sample ``index`` (default ``sample_of``:
    tensors with the batch first; a family whose argument stacks more than one row per sample says how).
    ``select_rows(rotary, rows)``: the rotary argument at those rows (default: every table of the tuple; a
    rotary made of an image table and a text table selects in the image's alone).
    ``joint_sequence``: the block's first argument is the joint [text; image] sequence and it returns that
    sequence (single-stream blocks that receive the concatenation); the image is its last N tokens, N from the
    block's grid, and only they are merged.
    """

    def __init__(self, state: BlockState, attention: Optional[torch.nn.Module], image_output: int,
                 rotary_argument: str, rows_before_image: Callable[[dict], int],
                 followers: Optional[Followers] = None, joint_sequence: bool = False,
                 select_rows: Optional[Callable[[object, torch.Tensor], object]] = None,
                 sample: Optional[Callable[[str, object, int, int], object]] = None):
        super().__init__(state)
        self.sample = sample or (lambda name, value, index, batch: sample_of(value, index, batch))
        self.joint_sequence = joint_sequence
        self.select_rows = select_rows or every_table
        self.attention = attention
        self.image_output = image_output
        self.rotary_argument = rotary_argument
        self.rows_before_image = rows_before_image
        self.followers = followers

    def new_forward(self, module, *args, **kwargs):
        bound, extra = self.signature.split(args, kwargs)
        first = self.signature.names[0]
        hidden, text = bound[first], None
        if self.joint_sequence:
            grid = self.state.grid.get()
            if grid is None or math.prod(grid) >= hidden.shape[1]:
                raise ValueError(f"{self.state.name}: the joint sequence has {hidden.shape[1]} tokens but the image "
                                 f"grid is {grid}; token fusion cannot find the image tokens in it")
            n = math.prod(grid)
            text, hidden = hidden[:, :hidden.shape[1] - n], hidden[:, hidden.shape[1] - n:]
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
            block_input = merged if text is None else torch.cat([text, merged], dim=1)
            if rotary is None:
                call_args, call_kwargs = self.signature.join({**bound, first: block_input}, extra)
                outputs = [self.fn_ref.original_forward(*call_args, **call_kwargs)]
            else:
                offset = text.shape[1] if text is not None else self.rows_before_image(bound)
                outputs = self._per_sample(bound, extra, first, block_input, rotary, plan, offset)
            if text is not None:  # the joint sequence back: its text as computed, all N image tokens
                out = torch.cat(outputs)
                t = text.shape[1]
                with record_function("tofu_diffusion::unmerge"):
                    image = hidden + plan.unmerge(out[:, t:] - merged)
                return torch.cat([out[:, :t], image], dim=1)
            images = torch.cat([out[self.image_output] for out in outputs])
            texts = torch.cat([out[1 - self.image_output] for out in outputs])
            with record_function("tofu_diffusion::unmerge"):
                image = hidden + plan.unmerge(images - merged)
            return (texts, image) if self.image_output == 1 else (image, texts)
        finally:
            self.state.end()

    def _per_sample(self, bound: dict, extra: tuple, first: str, merged: torch.Tensor, rotary, plan,
                    offset: int) -> list:
        batch = merged.shape[0]
        before = torch.arange(offset, device=plan.kept_idx.device)
        outputs = []
        for b in range(batch):
            one = {name: self.sample(name, value, b, batch) for name, value in bound.items()}
            one[first] = merged[b:b + 1]
            rows = torch.cat([before, offset + plan.kept_idx[b]])
            one[self.rotary_argument] = self.select_rows(rotary, rows)
            call_args, call_kwargs = self.signature.join(one, tuple(sample_of(v, b, batch) for v in extra))
            outputs.append(self.fn_ref.original_forward(*call_args, **call_kwargs))
        return outputs


def every_table(rotary, rows: torch.Tensor):
    """``(cos, sin)`` (or any tuple of tables over one sequence) at ``rows``."""
    return tuple(r.index_select(0, rows.to(r.device)) for r in rotary)


def image_table_of_pair(rotary, rows: torch.Tensor):
    """``(image table, text table)``: the image's at ``rows``, the text's whole."""
    image, text = rotary
    return image.index_select(0, rows.to(image.device)), text


def text_rows(arguments: dict) -> int:
    """A table over [text; image] (text first): the text's rows, ``encoder_hidden_states``' length."""
    return arguments["encoder_hidden_states"].shape[1]


def no_rows_before_image(arguments: dict) -> int:
    """A table over the image tokens alone."""
    return 0
