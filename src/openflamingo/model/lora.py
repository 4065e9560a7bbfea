"""LoRA adapters through peft: on the language model, and on the linear layers of the gated cross-attention blocks.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the LM keeps its class and module paths and
Flamingo's hooks keep working. A checkpoint stores the LM's as a standard peft adapter directory
(`adapter/adapter_config.json` + `adapter/adapter_model.safetensors`, keys `base_model.model.<LM key>`), which
`peft.PeftModel.from_pretrained` also reads; the blocks' go to a second one, `cross_attention_adapter/`, with keys
relative to the `cross_attn_blocks` ModuleDict (`base_model.model.<block index>.attn.to_q.lora_A.weight`).
`model.safetensors` keeps the base weights under their plain names.

In the blocks, a listed linear layer trains through its adapter instead of in full: its base weight freezes. The rest
of the blocks trains as without LoRA: the linear layers not listed, the norms and the gates (a few vectors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, MissingDependencyError, MissingFileError

ADAPTER_DIR = "adapter"
CROSS_ATTENTION_ADAPTER_DIR = "cross_attention_adapter"
PEFT_PREFIX = "base_model.model."
# Flamingo hooks these modules and owns their added-token rows: adapting them would bypass both.
NOT_ADAPTABLE = ("lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # The LM's linear layers to adapt; [] leaves the LM frozen (LoRA on the cross-attention blocks only).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # The cross-attention blocks' linear layers that train through adapters instead of in full (to_q, to_kv, to_out,
    # and fc1/fc2 or gate_proj/up_proj/down_proj); [] trains the blocks in full.
    cross_attention_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InputError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules and not self.cross_attention_modules:
            raise InputError(
                "lora.target_modules and lora.cross_attention_modules are both empty; name the LM's linear layers "
                "(e.g. q_proj) or the cross-attention blocks' (e.g. to_q) to adapt"
            )
        refused = [name for name in self.target_modules if name.split(".")[-1] in NOT_ADAPTABLE]
        if refused:
            raise InputError(f"lora.target_modules: {refused[0]!r} cannot take LoRA (Flamingo hooks it)")

    def peft_config(self, target_modules: list[str]):
        peft = _import_peft()
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(target_modules),
        )


def _import_peft():
    try:
        import peft
    except ImportError:
        raise MissingDependencyError(
            "LoRA needs peft: pip install 'openflamingo[train]' (or pip install peft)"
        ) from None
    return peft


def add_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Adapters on a Flamingo model's LM (`settings.target_modules`) and cross-attention blocks
    (`settings.cross_attention_modules`), in that order (the order their random initialisations are drawn in)."""
    if settings.target_modules:
        inject_lora(model.language_model, settings)
    if settings.cross_attention_modules:
        inject_cross_attention_lora(model.cross_attn_blocks, settings)


def inject_lora(language_model: nn.Module, settings: LoraSettings) -> None:
    """Add trainable LoRA adapters to `language_model` in place; everything else in it stays as it was."""
    present = {name.split(".")[-1] for name, _ in language_model.named_modules()}
    missing = [name for name in settings.target_modules if name.split(".")[-1] not in present]
    if missing:
        raise InputError(
            f"lora.target_modules: {missing[0]!r} is not a module of this LM; its linear layers: "
            f"{linear_layer_names(language_model)}"
        )
    _inject(language_model, settings.peft_config(settings.target_modules))


def inject_cross_attention_lora(blocks: nn.ModuleDict, settings: LoraSettings) -> None:
    """Adapters on the listed linear layers of every block, whose base weights then freeze."""
    linear = linear_layer_names(blocks)
    unknown = [name for name in settings.cross_attention_modules if name not in linear]
    if unknown:
        raise InputError(
            f"lora.cross_attention_modules: {unknown[0]!r} is not a linear layer of these cross-attention blocks; "
            f"theirs: {linear}"
        )
    _inject(blocks, settings.peft_config(settings.cross_attention_modules))
    for name, param in blocks.named_parameters():
        if ".base_layer." in name:
            param.requires_grad_(False)


def linear_layer_names(module: nn.Module) -> list[str]:
    return sorted({n.split(".")[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})


def _inject(module: nn.Module, peft_config) -> None:
    peft = _import_peft()
    trainable = {name: p.requires_grad for name, p in module.named_parameters()}
    peft.inject_adapter_in_model(peft_config, module)
    # peft freezes every non-adapter parameter; keep the caller's choices (e.g. fully trained layers).
    for name, param in module.named_parameters():
        base = plain_key(name)
        if base in trainable:
            param.requires_grad_(trainable[base])


def is_lora_key(key: str) -> bool:
    return ".lora_" in key


def plain_key(key: str) -> str:
    """The name a base weight has without adapters: `q_proj.base_layer.weight` -> `q_proj.weight`."""
    return key.replace(".base_layer.", ".")


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's file names."""
    peft = _import_peft()
    state = peft.get_peft_model_state_dict(module)
    return {PEFT_PREFIX + key: value.detach().contiguous().cpu().clone() for key, value in state.items()}


def save_adapters(model: nn.Module, settings: LoraSettings, directory: Path) -> None:
    """A Flamingo model's adapters as peft adapter directories in checkpoint `directory`."""
    if settings.target_modules:
        peft_config = settings.peft_config(settings.target_modules)
        save_adapter(model.language_model, peft_config, directory / ADAPTER_DIR)
    if settings.cross_attention_modules:
        peft_config = settings.peft_config(settings.cross_attention_modules)
        save_adapter(model.cross_attn_blocks, peft_config, directory / CROSS_ATTENTION_ADAPTER_DIR)


def save_adapter(module: nn.Module, peft_config, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(module), directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = peft_config.to_dict()
    config["peft_type"] = str(config.get("peft_type", "LORA")).split(".")[-1]
    config["target_modules"] = sorted(config.get("target_modules") or [])
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")


def load_adapters(model: nn.Module, settings: LoraSettings, directory: Path) -> None:
    """Copy the adapters of checkpoint `directory` into those `add_lora(model, settings)` injected."""
    if settings.target_modules:
        load_adapter(model.language_model, directory / ADAPTER_DIR)
    if settings.cross_attention_modules:
        load_adapter(model.cross_attn_blocks, directory / CROSS_ATTENTION_ADAPTER_DIR)


def load_adapter(module: nn.Module, directory: Path) -> None:
    """Copy a saved adapter into the LoRA modules already injected; a missing or extra key is an error."""
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise MissingFileError(f"{path} not found: the checkpoint's config has LoRA but no adapter weights")
    saved = load_file(path)
    expected = adapter_state(module)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise InputError(f"{path}: {len(missing)} missing / {len(unexpected)} unexpected key(s), e.g. {what}")
    for key, value in saved.items():
        if value.shape != expected[key].shape:
            raise InputError(
                f"{path}: {key} has shape {tuple(value.shape)}, model expects {tuple(expected[key].shape)}"
            )
    peft = _import_peft()
    peft.set_peft_model_state_dict(module, {k[len(PEFT_PREFIX) :]: v for k, v in saved.items()})


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain layer back; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
            merged += 1
    if hasattr(module, "peft_config"):
        del module.peft_config
    return merged
