"""save_pretrained / load: exact round trips, strict loading, atomic writes."""

import dataclasses
import json

import pytest
import torch
from helpers.model import TEXTS, batch, tiny_config
from safetensors.torch import load_file, save_file
from tiny import TINY_CLIP
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

import openflamingo
from openflamingo import VisionConfig, build_flamingo, save_pretrained


@pytest.fixture()
def model(tokenizer_dir, tmp_path):
    """A model whose backbones are referenced by local path, as real ones are."""
    random_backbones = build_flamingo(tiny_config(tokenizer_dir), seed=0)
    random_backbones.language_model.save_pretrained(tmp_path / "lm")
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(tmp_path / "vision")
    config = dataclasses.replace(
        tiny_config(tokenizer_dir),
        language_model=str(tmp_path / "lm"),
        language_model_config=None,
        tokenizer=None,
        vision=VisionConfig("hf_clip", path=str(tmp_path / "vision")),
    )
    model = build_flamingo(config, seed=0).eval()
    with torch.no_grad():  # move every new parameter away from its init so a missed tensor would show
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("include_backbones", [False, True])
def test_save_load_round_trip_gives_identical_logits(model, tmp_path, include_backbones):
    inputs = batch(model, TEXTS, [2, 1])
    save_pretrained(model, tmp_path / "ckpt", include_backbones=include_backbones)
    if include_backbones:  # self-contained: the backbone directories are no longer needed
        for backbone in ("lm", "vision"):
            (tmp_path / backbone).rename(tmp_path / f"{backbone}.moved")
    reloaded = openflamingo.load(tmp_path / "ckpt").eval()
    assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert any(k.startswith("language_model.") for k in stored) == include_backbones
    assert all(
        k.startswith(
            ("perceiver.", "cross_attn_blocks.", "added_tokens.", "language_model.", "vision_encoder.")
        )
        for k in stored
    )


def test_checkpoint_without_backbones_is_small(model, tmp_path):
    save_pretrained(model, tmp_path / "ckpt")
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(stored) == trainable


def test_missing_or_unexpected_tensors_are_errors(model, tmp_path):
    save_pretrained(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(path)
    state.pop("perceiver.latents")
    state["perceiver.extra"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(
        ValueError, match=r"1 missing key\(s\): perceiver.latents; 1 unexpected key\(s\): perceiver.extra"
    ):
        openflamingo.load(tmp_path / "ckpt")


def test_save_is_atomic_and_refuses_to_overwrite(model, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pretrained(model, target)
    with pytest.raises(FileExistsError):
        save_pretrained(model, target)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model.tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, target, overwrite=True)
    assert json.loads((target / "config.json").read_text())["format"] == "openflamingo"  # old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt",
        "lm",
        "vision",
    ]  # no temporary directory left


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an openflamingo checkpoint directory"):
        openflamingo.load(tmp_path)
