"""Named architectures: the presets build, agree with what their converters produce, and the table of their sizes
in docs/released-models.md is what `openflamingo presets` derives."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from openflamingo import FlamingoConfig
from openflamingo.model.convert.idefics import idefics_flamingo_config
from openflamingo.model.presets import preset, preset_names, preset_table, with_preset
from openflamingo.train.config import run_config

RELEASED_MODELS = Path(__file__).parent.parent / "docs" / "released-models.md"


def test_the_documented_table_is_the_derived_one():
    assert preset_table() in RELEASED_MODELS.read_text()


@pytest.mark.parametrize("name", preset_names())
def test_a_preset_is_a_model_section_a_recipe_builds_on(name):
    section = with_preset(
        {"preset": name, "language_model": "models/lm", "vision": {"path": "models/vision"}}
    )
    config = FlamingoConfig.from_dict(section)
    assert config.vision.path == "models/vision" and config.language_model == "models/lm"
    assert config.vision.kind == preset(name)["model"]["vision"]["kind"]
    run = run_config(
        {"model": {"preset": name, "language_model": "models/lm"}, "datasets": {"pairs": {"batch_size": 2}}}
    )
    assert run.model.cross_attention == config.cross_attention


class Llama32kTokenizer:
    """What the converter reads of IDEFICS' tokenizer: LLaMA's 32,000 tokens + its two added ones."""

    eos_token, pad_token = "</s>", "<unk>"

    def __len__(self) -> int:
        return 32002

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<fake_token_around_image>": 32000, "<image>": 32001}[token]


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("idefics")])
def test_idefics_presets_are_what_converting_the_download_gives(name, tmp_path):
    shapes = preset(name)["shapes"]
    lm, vision = shapes["language_model"], shapes["vision"]
    qk = preset(name)["model"]["cross_attention"]["qk_norm"]
    # config.json as the Hub repo has it (the fields that describe the architecture)
    config = {
        "vocab_size": lm["vocab_size"], "additional_vocab_size": 2, "hidden_size": lm["hidden_size"],
        "intermediate_size": lm["intermediate_size"], "num_hidden_layers": lm["num_hidden_layers"],
        "num_attention_heads": lm["num_attention_heads"], "rms_norm_eps": 1e-6, "cross_layer_interval": 4,
        "alpha_type": "float", "alpha_initializer": "zeros", "qk_layer_norms": qk, "use_resampler": True,
        "vision_config": {
            "embed_dim": vision["hidden_size"], "image_size": 224, "intermediate_size": vision["intermediate_size"],
            "patch_size": 14, "num_attention_heads": 16, "num_hidden_layers": vision["num_hidden_layers"],
        },
        "perceiver_config": {
            "use_resampler": True, "resampler_n_latents": 64, "resampler_depth": 6, "resampler_n_heads": 16,
            "resampler_head_dim": 96, "qk_layer_norms_perceiver": qk,
        },
    }  # fmt: skip
    converted = idefics_flamingo_config(tmp_path, config, Llama32kTokenizer(), instruct="instruct" in name)
    expected = FlamingoConfig.from_dict(
        {**with_preset({"preset": name}), "language_model_config": converted.language_model_config}
    )
    for part in ("perceiver", "cross_attention", "special_tokens", "prompt_format"):
        assert getattr(converted, part) == getattr(expected, part), part
    assert dataclasses.replace(converted.vision, config=None) == dataclasses.replace(
        expected.vision, config=None
    )
    assert json.dumps(converted.vision.config, sort_keys=True) == json.dumps(
        {**vision, "num_channels": 3}, sort_keys=True
    )
