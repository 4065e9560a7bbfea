"""Build a Flamingo model from its config: resolve the backbones, load them, attach the new parts."""

from __future__ import annotations

import os

import torch

from .config import FlamingoConfig
from .flamingo import Flamingo
from .vision import build_vision_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # backbones come from packages or local paths, never the hub


def build_language_model(config: FlamingoConfig):
    """(language model, tokenizer) in fp32; random init when `language_model_config` is given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if config.language_model_config is not None:
        lm_config = dict(config.language_model_config)
        model_type = lm_config.pop("model_type", None)
        if model_type is None:
            raise ValueError("language_model_config needs a 'model_type' (e.g. 'llama')")
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **lm_config))
        lm_dir = None
    else:
        if config.language_model is None:
            raise ValueError(
                "FlamingoConfig needs language_model (a name or local path) or language_model_config"
            )
        from ..backbones import resolve_language_model

        lm_dir = resolve_language_model(config.language_model)
        lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    tokenizer_source = config.tokenizer or lm_dir
    if tokenizer_source is None:
        raise ValueError("FlamingoConfig.tokenizer is required when the LM comes from language_model_config")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    return lm.float().eval(), tokenizer


def build_flamingo(config: FlamingoConfig, seed: int | None = None) -> Flamingo:
    """A Flamingo model with frozen backbones and freshly initialised new parts (seeded when `seed` is given)."""
    lm, tokenizer = build_language_model(config)
    vision = build_vision_encoder(config.vision).eval()
    if seed is not None:
        torch.manual_seed(seed)
    return Flamingo(config, vision, lm, tokenizer)
