"""One dataclass describes a whole Flamingo model: backbones by name or path, and the new parts' sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .cross_attention import CrossAttentionConfig
from .perceiver import PerceiverConfig
from .vision import VisionConfig


def dataclass_from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass `cls` from a dict; unknown keys are an error naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table/object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)


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
    train_language_model: bool = False
    train_vision_encoder: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["vision"] = self.vision.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlamingoConfig:
        data = dict(data)
        nested = {
            "vision": VisionConfig.from_dict(data.pop("vision", {"kind": "efficientnet_lite0"})),
            "perceiver": dataclass_from_dict(PerceiverConfig, data.pop("perceiver", {}), "perceiver"),
            "cross_attention": dataclass_from_dict(
                CrossAttentionConfig, data.pop("cross_attention", {}), "cross_attention"
            ),
        }
        config = dataclass_from_dict(cls, data, "flamingo config")
        return dataclasses.replace(config, **nested)
