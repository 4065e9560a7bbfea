"""LoRA adapters on the language model, through peft, and their files in a checkpoint.

Adapters are injected into the LM in place (`peft.inject_adapter_in_model`), so the LM keeps its class and module
paths and Flamingo's hooks keep working. A checkpoint stores them as a standard peft adapter directory
(`adapter/adapter_config.json` + `adapter/adapter_model.safetensors`, keys `base_model.model.<LM key>`), which
`peft.PeftModel.from_pretrained` also reads; `model.safetensors` keeps the base weights under their plain names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ADAPTER_DIR = "adapter"
PEFT_PREFIX = "base_model.model."
# Flamingo hooks these modules and owns their added-token rows: adapting them would bypass both.
NOT_ADAPTABLE = ("lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError(
                "lora.target_modules is empty; name the LM's linear layers to adapt, e.g. q_proj"
            )
        refused = [name for name in self.target_modules if name.split(".")[-1] in NOT_ADAPTABLE]
        if refused:
            raise ValueError(f"lora.target_modules: {refused[0]!r} cannot take LoRA (Flamingo hooks it)")

    def peft_config(self):
        peft = _import_peft()
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
        )


def _import_peft():
    try:
        import peft
    except ImportError:
        raise ImportError(
            "LoRA needs peft: pip install 'openflamingo[train]' (or pip install peft)"
        ) from None
    return peft


def inject_lora(language_model: nn.Module, settings: LoraSettings) -> None:
    """Add trainable LoRA adapters to `language_model` in place; everything else in it stays as it was."""
    peft = _import_peft()
    present = {name.split(".")[-1] for name, _ in language_model.named_modules()}
    missing = [name for name in settings.target_modules if name.split(".")[-1] not in present]
    if missing:
        linear = sorted(
            {n.split(".")[-1] for n, m in language_model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"lora.target_modules: {missing[0]!r} is not a module of this LM; its linear layers: {linear}"
        )
    trainable = {name: p.requires_grad for name, p in language_model.named_parameters()}
    peft.inject_adapter_in_model(settings.peft_config(), language_model)
    # peft freezes every non-adapter parameter; keep the caller's choices (e.g. fully trained layers).
    for name, param in language_model.named_parameters():
        base = name.replace(".base_layer.", ".")
        if base in trainable:
            param.requires_grad_(trainable[base])


def is_lora_key(key: str) -> bool:
    return ".lora_" in key


def plain_key(key: str) -> str:
    """The name a base weight has without adapters: `q_proj.base_layer.weight` -> `q_proj.weight`."""
    return key.replace(".base_layer.", ".")


def adapter_state(language_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's file names."""
    peft = _import_peft()
    state = peft.get_peft_model_state_dict(language_model)
    return {PEFT_PREFIX + key: value.detach().contiguous().cpu().clone() for key, value in state.items()}


def save_adapter(language_model: nn.Module, settings: LoraSettings, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        adapter_state(language_model), directory / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    config = settings.peft_config().to_dict()
    config["peft_type"] = str(config.get("peft_type", "LORA")).split(".")[-1]
    config["target_modules"] = sorted(config.get("target_modules") or [])
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")


def load_adapter(language_model: nn.Module, directory: Path) -> None:
    """Copy a saved adapter into the LoRA modules already injected; a missing or extra key is an error."""
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint's config has LoRA but no adapter weights")
    saved = load_file(path)
    expected = adapter_state(language_model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ValueError(f"{path}: {len(missing)} missing / {len(unexpected)} unexpected key(s), e.g. {what}")
    for key, value in saved.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)}, model expects {tuple(expected[key].shape)}"
            )
    peft = _import_peft()
    peft.set_peft_model_state_dict(language_model, {k[len(PEFT_PREFIX) :]: v for k, v in saved.items()})


def merge_lora(language_model: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain layer back; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(language_model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = language_model.get_submodule(parent_name) if parent_name else language_model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    if hasattr(language_model, "peft_config"):
        del language_model.peft_config
    return merged
