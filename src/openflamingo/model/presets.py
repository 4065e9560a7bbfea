"""Named architectures of the Flamingo family, as data (`presets/*.json`, like open_clip's model configs).

A preset holds the model section a recipe would otherwise spell out (vision encoder kind and options, perceiver,
cross-attention recipe, special tokens, prompt format) plus the shapes of its backbones, which size the model without
its weights. `[model] preset = "idefics-9b"` in a recipe starts from one; the recipe's own keys (the backbones'
paths, what trains) go on top. Converting a download (`openflamingo convert ...`) reads the architecture from the
download itself; the preset is what such a conversion produces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


@cache
def _read(name: str) -> dict[str, Any]:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise InputError(f"model.preset={name!r} is not known; presets: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def preset(name: str) -> dict[str, Any]:
    """The whole preset: description, download, convert command, model section, backbone shapes."""
    return json.loads(json.dumps(_read(name)))  # a copy the caller may change


def with_preset(model: dict[str, Any]) -> dict[str, Any]:
    """A recipe's model section with `preset` replaced by the preset's keys, the section's own keys on top."""
    if "preset" not in model:
        return model
    rest = {k: v for k, v in model.items() if k != "preset"}
    return _merged(preset(model["preset"])["model"], rest)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


@dataclass
class PresetSize:
    """Parameter counts of a preset, from its shapes (built on the meta device: no memory, no weights)."""

    language_model: int
    vision_encoder: int
    trainable: int  # perceiver + cross-attention blocks + the added tokens' rows: what trains by default

    @property
    def total(self) -> int:
        return self.language_model + self.vision_encoder + self.trainable

    def serve_bf16_gb(self) -> float:
        """Weights in bf16 (2 bytes each); the KV cache and activations come on top."""
        return self.total * 2 / 1e9

    def train_gb(self) -> float:
        """Frozen weights in bf16 (2 B) + the trained ones in fp32 with their gradient and AdamW's two moments
        (4 + 4 + 8 B); activations, LoRA adapters' own few weights and the data come on top."""
        return ((self.language_model + self.vision_encoder) * 2 + self.trainable * 16) / 1e9


def preset_size(name: str) -> PresetSize:
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from .cross_attention import CrossAttentionConfig, GatedCrossAttentionBlock
    from .language import SpecialTokens, find_decoder_layers
    from .perceiver import PerceiverConfig, PerceiverResampler

    data = preset(name)
    model, shapes = data["model"], data["shapes"]
    lm_shape = dict(shapes["language_model"])
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(lm_shape.pop("model_type"), **lm_shape))
        vision = CLIPVisionModel(CLIPVisionConfig(**shapes["vision"]))
        vision_dim = vision.config.hidden_size
        perceiver = PerceiverResampler(vision_dim, PerceiverConfig(**model["perceiver"]))
        cross = CrossAttentionConfig(**model["cross_attention"])
        lm_dim = lm.get_input_embeddings().weight.shape[1]
        _, layers = find_decoder_layers(lm)
        blocks = [
            GatedCrossAttentionBlock(lm_dim, vision_dim, cross) for _ in cross.block_layers(len(layers))
        ]
    tokens = SpecialTokens(**model.get("special_tokens", {}))
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    added = len(tokens.added) * lm_dim * (1 if tied else 2)

    def count(*modules) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    return PresetSize(count(lm), count(vision), count(perceiver, *blocks) + added)


def preset_table() -> str:
    """The presets as a Markdown table: parameters and the memory their weights need (derived, see PresetSize)."""
    rows = [
        "| preset | from | parameters (LM + vision + new) | trained by default | serve, bf16 weights | train, frozen "
        "bf16 + new parts fp32 AdamW |",
        "|---|---|---|---|---|---|",
    ]
    for name in preset_names():
        size, data = preset_size(name), preset(name)
        rows.append(
            f"| `{name}` | {data['download']['checkpoint']} | {size.total / 1e9:.2f}B "
            f"({size.language_model / 1e9:.2f} + {size.vision_encoder / 1e9:.2f} + {size.trainable / 1e9:.2f}) | "
            f"{size.trainable / 1e9:.2f}B | {size.serve_bf16_gb():.1f} GB | {size.train_gb():.1f} GB |"
        )
    return "\n".join(rows)
