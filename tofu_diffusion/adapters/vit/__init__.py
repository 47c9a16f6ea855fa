"""Vision-transformer classifiers: transformers' ViT and DeiT (CLS and distillation tokens protected).

Tokens are reduced for good, layer by layer, and their sizes travel with them; every layer after the
first merge uses proportional attention (``log(size)`` of each key added to the logits, passed as the
additive float mask the layer already forwards to SDPA, so fused kernels stay usable). All through
``diffusers.hooks``; no layer forward is re-implemented:

* ``tome`` / ``tofu`` merge between attention and MLP, as ToMe does. The layer adds its MLP output to
  an unmerged residual, so the hooks work around it: the metric (keys averaged over heads) is read from
  ``k_proj``; ``layernorm_after`` receives the merged tokens ``m``; the MLP's output is unmerged to keep
  the layer's own addition well-shaped, and the layer's output becomes ``m + mlp(norm(m))``, exactly
  ToMe's, on the reduced tokens.
* ``mctf`` merges at the start of the layer. The layer's attention on the unmerged tokens (one
  ``q k^T``) gives the informativeness; the tokens are fused (weights: attention received times size),
  the attention matrix is fused alongside (``core.apply_fused_attention``), and a registered transformers
  attention function applies it to the merged tokens' values: no second ``q k^T``, and the merged
  tokens' queries and keys are never projected.

Modules: ``model`` (which models, their tokens), ``state`` (per-call state), ``hooks`` (the layer hooks),
``attention`` (MCTF's fused attention function), ``adapter`` (checks and attaches).
"""

from .adapter import ADAPTER, ClassifierAdapter
from .model import backbone_of, check_supported, num_tokens

__all__ = ["ADAPTER", "ClassifierAdapter", "backbone_of", "check_supported", "num_tokens"]
