"""Build a Flamingo model from its config: resolve the backbones, load them, attach the new parts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import InputError
from .config import FlamingoConfig
from .convert.mpt import add_qk_layernorm, is_remote_code_mpt, load_mpt_with_qk_layernorm, uses_qk_layernorm
from .flamingo import Flamingo
from .lora import add_lora
from .vision import build_vision_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # backbones come from packages or local paths, never the hub


def build_language_model(config: FlamingoConfig):
    """(language model, tokenizer) in fp32; random init when `language_model_config` is given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.language_model_config is not None:
        lm_config = dict(config.language_model_config)
        model_type = lm_config.pop("model_type", None)
        if model_type is None:
            raise InputError("language_model_config needs a 'model_type' (e.g. 'llama')")
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **lm_config))
        if uses_qk_layernorm(lm.config):
            add_qk_layernorm(lm)
        lm_dir = None
    else:
        if config.language_model is None:
            raise InputError(
                "FlamingoConfig needs language_model (a name or local path) or language_model_config"
            )
        from ..backbones import resolve_language_model

        lm_dir = resolve_language_model(config.language_model)
        if is_remote_code_mpt(lm_dir):
            raise InputError(
                f"{lm_dir} holds MosaicML remote code; convert it first: openflamingo convert mosaic-gpt {lm_dir} OUT"
            )
        if uses_qk_layernorm(json.loads((lm_dir / "config.json").read_text())):
            lm = load_mpt_with_qk_layernorm(lm_dir)  # an option transformers' MPT lacks (convert/mpt.py)
        else:
            lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    tokenizer_source = config.tokenizer or lm_dir
    if tokenizer_source is None:
        raise InputError("FlamingoConfig.tokenizer is required when the LM comes from language_model_config")
    return lm.float().eval(), load_tokenizer(tokenizer_source)


def load_tokenizer(directory):
    """A tokenizer directory's tokenizer, with a pad token only when its files name one.

    transformers 5 gives some tokenizer classes a pad token of their own when the files name none (GPT-NeoX's:
    <|padding|>); 4.x did not. The files decide, so both versions build the same vocabulary, and the one OpenFlamingo's
    releases were trained with (gpt-neox-20b's tokenizer + <|endofchunk|>, <image>, <PAD>)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is not None and not _declares_pad_token(directory):
        tokenizer.pad_token = None
    return tokenizer


def _declares_pad_token(directory) -> bool:
    """Whether a tokenizer directory's own files name a pad token."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = Path(directory) / name
        if path.is_file() and json.loads(path.read_text()).get("pad_token") is not None:
            return True
    return False


def build_flamingo(config: FlamingoConfig, seed: int | None = None) -> Flamingo:
    """A Flamingo model with frozen backbones and freshly initialised new parts (seeded when `seed` is given).

    Building only: a config that starts from saved weights (`init_from`) goes to `checkpoint.build_or_load`."""
    if config.init_from is not None:
        raise InputError(
            f"init_from={config.init_from!r}: build_flamingo builds fresh models; start from saved weights with "
            "openflamingo.build_or_load(config) or openflamingo.load(directory, config=config)"
        )
    lm, tokenizer = build_language_model(config)
    vision = build_vision_encoder(config.vision).eval()
    if seed is not None:
        torch.manual_seed(seed)
    model = Flamingo(config, vision, lm, tokenizer)
    if config.lora is not None:
        add_lora(model, config.lora)
    return model
