"""Checkpoints as `config.json` + `model.safetensors` (+ the tokenizer): never pickle.

By default only the Flamingo parts are stored (perceiver, cross-attention blocks, added token embeddings) and the
backbones are referenced by name or path; `include_backbones=True` stores them too, making the directory
self-contained. Directories are written under a temporary name and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .build import build_flamingo
from .config import FlamingoConfig
from .flamingo import Flamingo

FORMAT = "openflamingo"
FORMAT_VERSION = 1
BACKBONES = ("language_model.", "vision_encoder.")


def _stored_backbones(config: FlamingoConfig, include_backbones: bool) -> tuple[str, ...]:
    """Backbones whose weights go into the checkpoint: on request, when trained, or when nothing else holds them
    (randomly initialised from a config)."""
    lm = include_backbones or config.train_language_model or config.language_model is None
    vision = (
        include_backbones
        or config.train_vision_encoder
        or (config.vision.path is None and config.vision.kind != "efficientnet_lite0")
    )
    return ("language_model.",) * lm + ("vision_encoder.",) * vision


def _stored_keys(model: Flamingo, include_backbones: bool) -> list[str]:
    """Parameters a checkpoint holds: everything outside the backbones, plus the backbones that must be stored."""
    stored_backbones = _stored_backbones(model.config, include_backbones)
    return [
        name
        for name in model.state_dict()
        if not name.startswith(BACKBONES) or name.startswith(stored_backbones)
    ]


def _self_contained(model: Flamingo, include_backbones: bool) -> FlamingoConfig:
    """The config to save: backbones stored in the checkpoint are described by architecture, not by path."""
    config = model.config
    stored = _stored_backbones(config, include_backbones)
    if "language_model." in stored:
        config = dataclasses.replace(
            config, language_model=None, language_model_config=model.language_model.config.to_dict()
        )
    if "vision_encoder." in stored:
        config = dataclasses.replace(config, vision=model.vision_encoder.self_contained_config())
    return config


def save_pretrained(
    model: Flamingo, directory: str | Path, include_backbones: bool = False, overwrite: bool = False
):
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    config = _self_contained(model, include_backbones)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        state = model.state_dict()
        tensors = {k: state[k].detach().contiguous().cpu() for k in _stored_keys(model, include_backbones)}
        # Tied weights share storage; safetensors refuses aliases, so store each tensor as its own copy.
        tensors = {k: v.clone() for k, v in tensors.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": FORMAT})
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "flamingo": config.to_dict(),
            "special_token_ids": dataclasses.asdict(model.special_ids),
            "includes_backbones": include_backbones,
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an openflamingo checkpoint directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {meta['format_version']} is newer than this openflamingo supports"
        )
    return meta


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> Flamingo:
    """Rebuild a model saved with `save_pretrained`; every stored tensor must load, and every expected one exist."""
    directory = Path(directory)
    meta = read_config(directory)
    config = FlamingoConfig.from_dict(meta["flamingo"])
    config = dataclasses.replace(config, tokenizer=str(directory / "tokenizer"))
    model = build_flamingo(config)
    saved_ids = meta.get("special_token_ids", {})
    if saved_ids and saved_ids != dataclasses.asdict(model.special_ids):
        raise ValueError(
            f"{directory}: tokenizer special ids {dataclasses.asdict(model.special_ids)} != saved {saved_ids}"
        )
    state = load_file(directory / "model.safetensors", device=str(map_location))
    load_strict(model, state, _stored_keys(model, meta.get("includes_backbones", False)), source=directory)
    return model.to(map_location)


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], expected: list[str], source) -> None:
    """Copy `state` into `model`; a missing, unexpected or mis-shaped tensor is an error naming it."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: {_key_list('missing', missing)}{_key_list('unexpected', unexpected)}".rstrip("; ")
        )
    own = model.state_dict()
    for key in expected:
        if own[key].shape != state[key].shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, model expects {tuple(own[key].shape)}"
            )
    result = model.load_state_dict(state, strict=False)
    leftover = sorted(set(result.unexpected_keys))
    if leftover:
        raise ValueError(f"{source}: could not load {leftover}")


def _key_list(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    return f"{len(keys)} {what} key(s): {shown}; "
