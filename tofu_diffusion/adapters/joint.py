"""Joint-attention blocks: text and image attend together, and the block returns ``(text, image)``.

Only the image tokens are reduced: a block runs whole (``merge_scope="block"``) on the merged image tokens
with every text token, so each text token sees the reduced image and the text stream is returned as the
block computed it; the image stream comes back as all N tokens (``x + unmerge(f(m) - m)``). ToDo shrinks the
image's keys and values inside the joint attention (its ``to_k`` / ``to_v`` and any image-only ``attn2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TokenFusionConfig
from . import todo
from .blocks import BlockAdapter, self_attention
from .hooks import WHOLE_BLOCK_HOOK, WholeBlockHook
from .planning import BlockState
from .registry import register


@dataclass(frozen=True)
class JointBlockAdapter(BlockAdapter):
    image_output: int = 1  # the image stream's index in the block's output

    def refuse(self, model_name: str, config: TokenFusionConfig) -> None:
        if config.merge_scope != "block":
            raise ValueError(f"{model_name}'s joint-attention blocks are reduced whole (image tokens merged, text "
                             f"tokens kept): use merge_scope='block'; merge_scope='sublayers' is not available "
                             f"for them")
        super().refuse(model_name, config)

    def attach_block(self, block: torch.nn.Module, state: BlockState, config: TokenFusionConfig) -> None:
        if config.method == "todo":  # image keys/values only
            for joint in (getattr(block, "attn", None), getattr(block, "attn2", None)):
                if joint is not None:
                    todo.attach_projections(joint, state)
            return
        attention = self_attention(block) if config.method == "mctf" else None
        register(block, WholeBlockHook(state, attention, self.image_output), WHOLE_BLOCK_HOOK)
