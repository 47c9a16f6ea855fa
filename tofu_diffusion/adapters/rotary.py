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

    ``rotary_argument``: the block's rotary ``(cos, sin)`` argument, each (rows before the image + N, D), or None
    when the block has no table shared by the batch (a per-sample table is a follower); ``rows_before_image
    (arguments)``: how many of its rows come before the image stream's (the text's, when the table covers
    [text; image]; 0 when it covers the image alone). Without a rotary table the batch runs in one call.
    ``followers``: other per-token arguments (an attention mask over [image; text]) made to fit the plan before
    the batch is split; they receive the plan over the whole image stream (or the joint sequence), in which
    every token outside the reduced grid is kept whole (``MergePlan.within``).
    ``sample(name, value, index, batch)``: argument ``name``'s part for sample ``index`` (default ``sample_of``:
    tensors with the batch first; a family whose argument stacks more than one row per sample says how).
    ``select_rows(rotary, rows)``: the rotary argument at those rows (default: every table of the tuple; a
    rotary made of an image table and a text table selects in the image's alone).
    ``joint_sequence``: the block's first argument is one sequence holding text and image, and it returns that
    sequence; ``image_at`` says where the image stream lies in it: ``"end"`` (single-stream blocks on
    [text; image], whose table covers the sequence) or ``"start"`` (Z-Image's [image; padding; text]).

    The image stream is the grid's N tokens, then the tokens its grid function keeps whole (reference images,
    ``ImageLayout.kept_whole``): those, like the text, enter the block as they are, keep their rotary rows and
    come out as the block computed them.
    """

    def __init__(self, state: BlockState, attention: Optional[torch.nn.Module], image_output: int,
                 rotary_argument: Optional[str], rows_before_image: Callable[[dict], int],
                 followers: Optional[Followers] = None, joint_sequence: bool = False,
                 select_rows: Optional[Callable[[object, torch.Tensor], object]] = None,
                 sample: Optional[Callable[[str, object, int, int], object]] = None, image_at: str = "end"):
        super().__init__(state)
        if image_at not in ("start", "end"):
            raise ValueError(f"image_at must be 'start' or 'end', not {image_at!r}")
        self.sample = sample or (lambda name, value, index, batch: sample_of(value, index, batch))
        self.joint_sequence = joint_sequence
        self.image_at = image_at
        self.select_rows = select_rows or every_table
        self.attention = attention
        self.image_output = image_output
        self.rotary_argument = rotary_argument
        self.rows_before_image = rows_before_image
        self.followers = followers

    def _image_span(self, sequence: torch.Tensor) -> tuple[int, int]:
        """(start, N) of the planned image tokens (the image's, and the references' when they are reduced) in the
        block's first argument."""
        n, kept = self.state.grid.planned_tokens(), self.state.grid.kept_whole()
        length = sequence.shape[1]
        if not self.joint_sequence and not kept:
            return 0, length  # the image stream is the grid's tokens (checked when planning)
        if n is None or n + kept > length or (not self.joint_sequence and n + kept != length):
            what = "joint sequence" if self.joint_sequence else "image stream"
            raise ValueError(f"{self.state.name}: the {what} has {length} tokens but the image grid is "
                             f"{self.state.grid.get()} with {kept} tokens kept whole after it; token fusion cannot "
                             f"find the image tokens")
        if self.joint_sequence and self.image_at == "end":
            return length - n - kept, n
        return 0, n

    def new_forward(self, module, *args, **kwargs):
        bound, extra = self.signature.split(args, kwargs)
        first = self.signature.names[0]
        sequence = bound[first]
        start, n = self._image_span(sequence)
        hidden = sequence[:, start:start + n]
        self.state.begin(hidden)
        try:
            plan = self.state.plan(self.attention, None)
            if plan is None:
                output = self.fn_ref.original_forward(*args, **kwargs)
                if self.state.cached_unmerge:
                    image = output[:, start:start + n] if self.joint_sequence else output[self.image_output][:, :n]
                    self.state.remember_update(image, minus=hidden)
                return output
            with record_function("tofu_diffusion::merge"):
                merged = plan.merge(hidden, self.state.merge_mode)
            whole = plan.within(start, sequence.shape[1])  # the plan over the sequence, the rest kept whole
            if self.followers:
                _, bound = follow(self.signature, (), bound, self.followers, whole)
            block_input = torch.cat([sequence[:, :start], merged, sequence[:, start + n:]], dim=1)
            rotary = bound.get(self.rotary_argument) if self.rotary_argument else None
            if rotary is None:
                call_args, call_kwargs = self.signature.join({**bound, first: block_input}, extra)
                outputs = [self.fn_ref.original_forward(*call_args, **call_kwargs)]
            else:
                offset = 0 if self.joint_sequence else self.rows_before_image(bound)
                outputs = self._per_sample(bound, extra, first, block_input, rotary, whole, offset)
            k = plan.num_kept
            if self.joint_sequence:  # the sequence back: all but the image as computed, all N image tokens
                out = torch.cat(outputs)
                with record_function("tofu_diffusion::unmerge"):
                    image = hidden + self.state.unmerged_update(plan, out[:, start:start + k] - merged)
                return torch.cat([out[:, :start], image, out[:, start + k:]], dim=1)
            images = torch.cat([out[self.image_output] for out in outputs])
            texts = torch.cat([out[1 - self.image_output] for out in outputs])
            with record_function("tofu_diffusion::unmerge"):
                image = torch.cat([hidden + self.state.unmerged_update(plan, images[:, :k] - merged), images[:, k:]],
                                  dim=1)
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
