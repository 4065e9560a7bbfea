"""Checkpoints as `config.json` + `model.safetensors` (+ the tokenizer): never pickle.

By default only the Flamingo parts are stored (perceiver, cross-attention blocks, added token embeddings) and the
backbones are referenced by name or path; `include_backbones=True` stores them too, making the directory
self-contained. Directories are written under a temporary name and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ExistingFileError, InputError, MissingFileError
from .build import build_flamingo
from .config import FlamingoConfig
from .files import atomic_directory
from .flamingo import Flamingo
from .lora import add_lora, is_lora_key, load_adapters, plain_key, save_adapters

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


def stored_keys(
    config: FlamingoConfig, names: Iterable[str], include_backbones: bool, decoder_layers_path: str
) -> list[str]:
    """Tensors `model.safetensors` holds, by plain name (LoRA adapters go to their own file): everything outside the
    backbones, the backbones that must be stored, and fully trained LM layers."""
    stored = _stored_backbones(config, include_backbones) + tuple(
        f"language_model.{decoder_layers_path}.{i}." for i in config.train_language_model_layers
    )
    return [
        plain_key(name)
        for name in names
        if not is_lora_key(name) and (not name.startswith(BACKBONES) or name.startswith(stored))
    ]


def _self_contained(model: Flamingo, include_backbones: bool) -> FlamingoConfig:
    """The config to save: backbones stored in the checkpoint are described by architecture, not by path, and the
    weights a run started from are in the checkpoint itself."""
    config = dataclasses.replace(model.config, init_from=None)
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
    """Write `model` to `directory` (config.json, model.safetensors, tokenizer/; with LoRA, adapter/ for the LM's
    adapters and cross_attention_adapter/ for the blocks'), atomically; `load(directory)` rebuilds it. An existing
    directory is replaced only with `overwrite=True`."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise ExistingFileError(f"{directory} exists; pass overwrite=True to replace it")
    config = _self_contained(model, include_backbones)
    with atomic_directory(directory) as tmp:
        full = model.state_dict()
        state = {plain_key(k): v for k, v in full.items() if not is_lora_key(k)}
        keys = stored_keys(model.config, full, include_backbones, model.decoder_layers_path)
        # Tied weights share storage; safetensors refuses aliases, so store each tensor as its own copy.
        tensors = {k: state[k].detach().contiguous().cpu().clone() for k in keys}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": FORMAT})
        if model.config.lora is not None:
            save_adapters(model, model.config.lora, tmp)
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "flamingo": config.to_dict(),
            "special_token_ids": dataclasses.asdict(model.special_ids),
            "includes_backbones": include_backbones,
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path} not found: not an openflamingo checkpoint directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {meta['format_version']} is newer than this openflamingo supports"
        )
    return meta


def load(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    config: FlamingoConfig | None = None,
    seed: int | None = None,
) -> Flamingo:
    """Rebuild a model saved with `save_pretrained`; every stored tensor must load, and every expected one exist.

    `config` (from `init_config`) builds the model with other training choices (what trains, LoRA, prompt
    format) around the same architecture: how a fine-tuning run starts from saved weights."""
    directory = Path(directory)
    meta = read_config(directory)
    saved = FlamingoConfig.from_dict(meta["flamingo"])
    config = dataclasses.replace(config or saved, tokenizer=str(directory / "tokenizer"), init_from=None)
    if saved.lora is not None and config.lora != saved.lora:
        raise InputError(
            f"{directory} has LoRA adapters {saved.lora}; merge them first "
            f"(openflamingo export --merge-lora {directory} OUT) or use the same [model.lora]"
        )
    model = build_flamingo(dataclasses.replace(config, lora=None), seed=seed)
    saved_ids = meta.get("special_token_ids", {})
    # Checkpoints saved before a field existed lack it (around_media): compare what they recorded.
    current = dataclasses.asdict(model.special_ids)
    if saved_ids and any(current.get(name) != value for name, value in saved_ids.items()):
        raise InputError(
            f"{directory}: tokenizer special ids {dataclasses.asdict(model.special_ids)} != saved {saved_ids}"
        )
    state = load_file(directory / "model.safetensors", device=str(map_location))
    includes = meta.get("includes_backbones", False)
    expected = stored_keys(saved, model.state_dict(), includes, model.decoder_layers_path)
    load_strict(model, state, expected, source=directory)
    if config.lora is not None:
        if seed is not None:
            torch.manual_seed(seed)
        add_lora(model, config.lora)
        if saved.lora is not None:
            load_adapters(model, config.lora, directory)
    model.config = config
    return model.to(map_location)


def build_or_load(config: FlamingoConfig, seed: int | None = None) -> Flamingo:
    """The model a run starts from: with `config.init_from`, every weight of that checkpoint (loaded strictly,
    LoRA adapters added after the weights they adapt); otherwise a fresh `build_flamingo(config, seed)`."""
    if config.init_from is not None:
        return load(config.init_from, config=config, seed=seed)
    return build_flamingo(config, seed=seed)


ARCHITECTURE_FREE = ("train_language_model", "train_vision_encoder", "train_language_model_layers", "lora")


def init_config(recipe: dict[str, Any]) -> dict[str, Any]:
    """The model section of a run that starts from the weights in `recipe["init_from"]`: the checkpoint's own
    architecture, with the recipe's choice of what trains (and its prompt format, else the checkpoint's). A recipe
    key that describes the architecture must agree with the checkpoint; the error names the first that does not."""
    directory = Path(recipe["init_from"])
    if not (directory / "config.json").is_file():
        raise MissingFileError(
            f"model.init_from: {directory} is not a save_pretrained directory (no config.json)"
        )
    meta = read_config(directory)
    saved = meta["flamingo"]
    free = (*ARCHITECTURE_FREE, "prompt_format", "init_from")
    architecture = {k: v for k, v in recipe.items() if k not in free}
    ours = _flatten(FlamingoConfig.from_dict(architecture).to_dict())
    theirs = _flatten(FlamingoConfig.from_dict(saved).to_dict())
    for key in _flatten(architecture):
        if ours.get(key) != theirs.get(key):
            raise InputError(
                f"model.{key}: the recipe has {ours.get(key)!r} but init_from {directory} was built with "
                f"{theirs.get(key)!r}; drop the key to use the checkpoint's"
            )
    trained = saved.get("train_language_model_layers") or []
    kept = recipe.get("train_language_model_layers") or []
    if not set(trained) <= set(kept):
        raise InputError(
            f"model.train_language_model_layers: init_from {directory} trained LM layers {sorted(trained)}; keep "
            f"them in the list, or their weights would not be saved"
        )
    model = {k: v for k, v in saved.items() if k not in free}
    model["prompt_format"] = recipe.get("prompt_format", saved.get("prompt_format", {}))
    model.update({k: recipe[k] for k in (*ARCHITECTURE_FREE, "init_from") if k in recipe})
    return model


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; sequences as lists, so TOML arrays and saved tuples compare equal."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "language_model_config":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return flat


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], expected: list[str], source) -> None:
    """Copy `state` into `model`; a missing, unexpected or mis-shaped tensor is an error naming it."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"{source}: {_key_list('missing', missing)}{_key_list('unexpected', unexpected)}".rstrip("; ")
        )
    own = model.state_dict()
    for key in expected:
        if own[key].shape != state[key].shape:
            raise InputError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, model expects {tuple(own[key].shape)}"
            )
    result = model.load_state_dict(state, strict=False)
    leftover = sorted(set(result.unexpected_keys))
    if leftover:
        raise InputError(f"{source}: could not load {leftover}")


def _key_list(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    return f"{len(keys)} {what} key(s): {shown}; "
