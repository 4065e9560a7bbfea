"""openflamingo: Flamingo-style vision-language models over any Hugging Face causal LM."""

from .model.build import build_flamingo
from .model.checkpoint import build_or_load, load, save_pretrained
from .model.config import FlamingoConfig
from .model.cross_attention import CrossAttentionConfig
from .model.flamingo import Flamingo, FlamingoOutput
from .model.language import add_special_tokens
from .model.perceiver import PerceiverConfig
from .model.vision import VisionConfig

__all__ = [
    "CrossAttentionConfig",
    "Flamingo",
    "FlamingoConfig",
    "FlamingoOutput",
    "PerceiverConfig",
    "VisionConfig",
    "add_special_tokens",
    "build_flamingo",
    "build_or_load",
    "load",
    "save_pretrained",
]
__version__ = "0.1.0"
