"""One dataclass describes a whole Flamingo model: backbones by name or path, and the new parts' sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config_loader import from_dict
from ..errors import InputError
from .cross_attention import CrossAttentionConfig
from .language import SpecialTokens
from .lora import LoraSettings
from .perceiver import PerceiverConfig
from .presets import with_preset
from .prompt_format import PromptFormat
from .vision import VisionConfig


@dataclass
class FlamingoConfig:
    # The language model: a packaged name (openflamingo.backbones) or a local HF directory. With
    # `language_model_config` (an HF config dict with "model_type") the LM is built randomly initialised instead,
    # for tests and for checkpoints that include the LM weights.
    language_model: str | None = None
    language_model_config: dict | None = None
    tokenizer: str | None = None  # defaults to the language model's directory
    vision: VisionConfig = field(default_factory=lambda: VisionConfig("efficientnet_lite0"))
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    decoder_layers_path: str | None = None  # found automatically for common LMs
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)
    train_language_model: bool = False
    train_vision_encoder: bool = False
    # Fine-tuning: decoder layers of the LM trained in full (by index), and LoRA adapters (peft) on the LM and/or
    # the cross-attention blocks (model/lora.py).
    train_language_model_layers: list[int] = field(default_factory=list)
    lora: LoraSettings | None = None
    # How prompts are written (Flamingo's plain format or the LM's chat template); recorded in checkpoints.
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    # Start from the weights of a save_pretrained directory (a new run, not a resume); see model/checkpoint.py.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.train_language_model and (self.lora_on_language_model or self.train_language_model_layers):
            raise InputError(
                "train_language_model trains the whole LM; drop lora.target_modules / train_language_model_layers, "
                "or set it false"
            )
        if any(i < 0 for i in self.train_language_model_layers):
            raise InputError(
                f"train_language_model_layers: layer indices must be >= 0, got {self.train_language_model_layers}"
            )

    @property
    def lora_on_language_model(self) -> bool:
        return self.lora is not None and bool(self.lora.target_modules)

    @property
    def adapts_language_model(self) -> bool:
        """Whether any LM weight trains (then the LM runs in train mode and its changed weights are saved)."""
        return (
            self.train_language_model or self.lora_on_language_model or bool(self.train_language_model_layers)
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["vision"] = self.vision.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlamingoConfig:
        """From a recipe's model section or a saved config; `preset` names an architecture to start from."""
        return from_dict(cls, with_preset(dict(data)), "model")
