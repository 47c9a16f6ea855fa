"""tofu-diffusion: ToMe, ToFu and MCTF token reduction for diffusers denoisers, as diffusers hooks."""

from .api import TokenFusionHandle, apply, calibrate_switch_depth, explain, family_of, fused, handle_of, remove
from .config import CLASSIFIER_METHODS, METHODS, TokenFusionConfig
from .core import MERGE_MODES
from .presets import PRESETS

__version__ = "0.1.0"

__all__ = ["CLASSIFIER_METHODS", "METHODS", "MERGE_MODES", "TokenFusionConfig", "PRESETS", "TokenFusionHandle", "apply",
           "calibrate_switch_depth", "explain", "family_of", "fused", "handle_of", "remove"]
