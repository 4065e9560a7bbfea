"""OpenFlamingo 2.0.1 state dicts -> this library's Flamingo, with strict key checking and a report.

Two source formats:
- released: what OpenFlamingo's training saves (`checkpoint.pt`): perceiver, the gated cross-attention blocks under
  `lang_encoder.<decoder layers>.<i>.gated_cross_attn_layer.*` and the resized input embedding matrix;
- full: `model.state_dict()` of an OpenFlamingo model, which also holds the open_clip vision tower and the whole LM,
  with each decoder block under three names (`old_decoder_blocks`, `<layers>.<i>.decoder_layer`, and the blocks
  under `gated_cross_attn_layers`).
Every source key maps to exactly one target (aliases must hold equal tensors) or is dropped for a stated reason; an
unknown key, a conflict or a missing target is an error naming it. Nothing is loaded with strict=False.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import InputError, MissingFileError
from ..build import build_flamingo
from ..config import FlamingoConfig
from ..cross_attention import CrossAttentionConfig
from ..flamingo import Flamingo
from ..open_clip import convert_open_clip_vision_state_dict
from ..perceiver import PerceiverConfig

# OpenFlamingo's nn.Sequential indices -> our module names
_PERCEIVER_LAYER = {"0": "attn", "1.0": "ff.norm", "1.1": "ff.fc1", "1.3": "ff.fc2"}
_FEED_FORWARD = {"0": "norm", "1": "fc1", "3": "fc2"}


@dataclass
class ConversionReport:
    format: str = ""
    mapped: Counter = field(default_factory=Counter)  # target group -> tensors loaded
    aliases: int = 0  # source keys that repeated a tensor already mapped
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why it is not needed
    kept_from_backbones: list[str] = field(default_factory=list)  # what the checkpoint does not hold
    sources: dict[str, str] = field(default_factory=dict)  # target key -> source key (rows noted as key[a:b])

    def summary(self) -> str:
        lines = [f"OpenFlamingo {self.format} state dict converted:"]
        lines += [f"  {group}: {n} tensors" for group, n in sorted(self.mapped.items())]
        lines.append(f"  aliases checked equal and skipped: {self.aliases}")
        lines += [f"  dropped {key}: {why}" for key, why in sorted(self.dropped.items())]
        lines += [f"  kept from the backbone: {what}" for what in self.kept_from_backbones]
        return "\n".join(lines)


def infer_open_flamingo_hparams(
    state: dict[str, torch.Tensor], heads: int = 8
) -> tuple[PerceiverConfig, CrossAttentionConfig]:
    """Perceiver and cross-attention sizes from tensor shapes (head count is not visible in shapes: OpenFlamingo
    uses 8 everywhere)."""
    if "perceiver.latents" not in state:
        raise InputError("not an OpenFlamingo state dict: no 'perceiver.latents'")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k)))
    inner = state["perceiver.layers.0.0.to_q.weight"].shape[0]
    ff_inner = state["perceiver.layers.0.1.1.weight"].shape[0]
    dim = state["perceiver.latents"].shape[1]
    frames = state["perceiver.frame_embs"].shape[0] if "perceiver.frame_embs" in state else None
    perceiver = PerceiverConfig(
        depth, state["perceiver.latents"].shape[0], heads, inner // heads, ff_inner // dim, frames
    )
    blocks = sorted(
        {int(m.group(1)) for k in state if (m := re.search(r"\.(\d+)\.gated_cross_attn_layer\.", k))}
    )
    if not blocks:
        blocks = sorted(
            {int(m.group(1)) for k in state if (m := re.search(r"gated_cross_attn_layers\.(\d+)\.", k))}
        )
    if not blocks:
        raise InputError("no gated cross-attention blocks found in the state dict")
    every = blocks[0] + 1
    if blocks != list(range(every - 1, blocks[-1] + 1, every)):
        raise InputError(f"cross-attention blocks at layers {blocks} do not follow an every-n-layers pattern")
    key = next(
        k
        for k in state
        if k.endswith("gated_cross_attn_layer.attn.to_q.weight")
        or re.search(r"gated_cross_attn_layers\.\d+\.attn\.to_q\.weight$", k)
    )
    x_inner, lm_dim = state[key].shape
    ff_key = key.replace("attn.to_q.weight", "ff.1.weight")
    cross = CrossAttentionConfig(every, heads, x_inner // heads, state[ff_key].shape[0] // lm_dim)
    return perceiver, cross


class _Mapping:
    """Collects target tensors, checking aliases and recording sources."""

    def __init__(self, report: ConversionReport):
        self.out: dict[str, torch.Tensor] = {}
        self.report = report

    def put(self, target: str, tensor: torch.Tensor, source: str, group: str) -> None:
        if target in self.out:
            if not torch.equal(self.out[target], tensor):
                raise InputError(
                    f"{source} and {self.report.sources[target]} both map to {target} but differ"
                )
            self.report.aliases += 1
            return
        self.out[target] = tensor
        self.report.sources[target] = source
        self.report.mapped[group] += 1


def _rename_block(rest: str) -> str:
    """gated block keys: attn.* and gates unchanged, ff.<idx>.* -> ff.<name>.*"""
    if rest.startswith("ff."):
        idx, tail = rest[3:].split(".", 1)
        return f"ff.{_FEED_FORWARD[idx]}.{tail}"
    return rest


def convert_open_flamingo_state_dict(
    state: dict[str, torch.Tensor], model: Flamingo
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map an OpenFlamingo state dict onto `model`'s keys. Returns (our state dict, report)."""
    report = ConversionReport()
    mapping = _Mapping(report)
    lm = model.language_model
    layers_path = model.decoder_layers_path
    module_names = {module: name for name, module in lm.named_modules()}
    embed_key = module_names[lm.get_input_embeddings()] + ".weight"
    head = lm.get_output_embeddings()
    head_key = module_names[head] + ".weight"
    first, n_added = model.special_ids.first_added, model.special_ids.num_added
    lm_keys = set(lm.state_dict())
    rename = _transformers_renames(lm)
    is_full = any(k.startswith("vision_encoder.") or ".decoder_layer." in k for k in state)
    report.format = "full" if is_full else "released"
    unknown = []
    vision_state = {}

    for key, tensor in state.items():
        if key.startswith("vision_encoder."):
            vision_state[key[len("vision_encoder.") :]] = tensor
        elif key.startswith("perceiver."):
            rest = key[len("perceiver.") :]
            if m := re.fullmatch(r"layers\.(\d+)\.(0|1\.[013])\.(.+)", rest):
                part = _PERCEIVER_LAYER[m.group(2)]
                mapping.put(f"perceiver.layers.{m.group(1)}.{part}.{m.group(3)}", tensor, key, "perceiver")
            elif rest == "frame_embs":
                mapping.put("perceiver.frame_embeddings", tensor, key, "perceiver")
            elif rest == "latents" or rest.startswith("norm."):
                mapping.put(key, tensor, key, "perceiver")
            else:
                unknown.append(key)
        elif key.startswith("lang_encoder."):
            rest = key[len("lang_encoder.") :]
            if (m := re.fullmatch(r"gated_cross_attn_layers\.(\d+)\.(.+)", rest)) or (
                m := re.fullmatch(re.escape(layers_path) + r"\.(\d+)\.gated_cross_attn_layer\.(.+)", rest)
            ):
                target = f"cross_attn_blocks.{m.group(1)}.{_rename_block(m.group(2))}"
                mapping.put(target, tensor, key, "cross_attn_blocks")
                continue
            if (m := re.fullmatch(r"old_decoder_blocks\.(\d+)\.(.+)", rest)) or (
                m := re.fullmatch(re.escape(layers_path) + r"\.(\d+)\.decoder_layer\.(.+)", rest)
            ):
                rest = f"{layers_path}.{m.group(1)}.{m.group(2)}"
            rest = rename(rest)
            if rest in (embed_key, head_key) or rest == module_names[head] + ".bias":
                _split_embedding(mapping, rest, tensor, key, embed_key, head_key, model, lm_keys)
            elif rest in lm_keys:
                mapping.put(f"language_model.{rest}", tensor, key, "language_model")
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise InputError(f"{len(unknown)} unknown OpenFlamingo key(s): {', '.join(sorted(unknown)[:10])}")

    if vision_state:
        if model.config.vision.kind != "open_clip":
            raise InputError(
                f"state dict holds an open_clip vision tower but the model's encoder is {model.config.vision.kind!r}"
            )
        converted, dropped = convert_open_clip_vision_state_dict(vision_state, model.config.vision.config)
        for k, v in converted.items():
            mapping.put(f"vision_encoder.{k}", v, f"vision_encoder.{k}", "vision_encoder")
        for k in dropped:
            report.dropped[f"vision_encoder.{k}"] = (
                "contrastive projection / pooled-output norm, unused by Flamingo"
            )

    _check_coverage(mapping.out, model, is_full, report, first, n_added)
    return mapping.out, report


def _transformers_renames(lm):
    """Key renames transformers applies when loading older checkpoints (e.g. GPT-NeoX `embed_out` became `lm_head`
    in transformers 5); OpenFlamingo state dicts use the names of the transformers they were saved with."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4.x: the names are already the 4.x ones
        return lambda key: key
    renames = [
        (source, target)
        for transform in get_model_conversion_mapping(lm)
        if type(transform) is WeightRenaming
        for i, source in enumerate(transform.source_patterns)
        # several source patterns may share one target pattern
        for target in [transform.target_patterns[min(i, len(transform.target_patterns) - 1)]]
    ]

    def rename(key: str) -> str:
        for source, target in renames:
            key = re.sub(source, target, key)
        return key

    return rename


def _split_embedding(mapping, rest, tensor, key, embed_key, head_key, model, lm_keys) -> None:
    """OpenFlamingo resized the LM vocabulary; our LM keeps its matrices and Flamingo's rows live in added_tokens."""
    first, n_added = model.special_ids.first_added, model.special_ids.num_added
    if tensor.shape[0] != first + n_added:
        raise InputError(
            f"{key} has {tensor.shape[0]} rows; expected {first + n_added} (tokenizer vocabulary)"
        )
    tied = model.added_tokens.tied
    if rest == embed_key:
        added_target, group = "added_tokens.input", "added_tokens"
    elif rest == head_key:
        added_target, group = ("added_tokens.input" if tied else "added_tokens.output"), "added_tokens"
    else:
        added_target, group = "added_tokens.output_bias", "added_tokens"
    mapping.put(added_target, tensor[first:], f"{key}[{first}:]", group)
    base = f"language_model.{rest}"
    own = model.language_model.state_dict()[rest]
    if own.shape[0] == first:
        mapping.put(base, tensor[:first], f"{key}[:{first}]", "language_model")
    else:
        # The LM matrix has rows beyond the tokenizer (padding for speed); OpenFlamingo dropped them.
        rows = own.clone()
        rows[:first] = tensor[:first]
        mapping.put(base, rows, f"{key}[:{first}]", "language_model")
        mapping.report.kept_from_backbones.append(
            f"{base} rows {first}..{own.shape[0] - 1} (beyond the tokenizer)"
        )


def _check_coverage(
    out, model: Flamingo, is_full: bool, report: ConversionReport, first: int, n_added: int
) -> None:
    own = model.state_dict()
    extra = sorted(set(out) - set(own))
    if extra:
        raise InputError(f"converted keys unknown to the model: {', '.join(extra[:10])}")
    for key, tensor in out.items():
        if tensor.shape != own[key].shape:
            raise InputError(
                f"{report.sources[key]} has shape {tuple(tensor.shape)}; {key} needs {tuple(own[key].shape)}"
            )
    required = [k for k in own if k.startswith(("perceiver.", "cross_attn_blocks.", "added_tokens.input"))]
    if is_full:
        required += [k for k in own if k.startswith(("language_model.", "vision_encoder."))]
    # Tied LMs list the shared matrix under two names; one of them suffices.
    tied_aliases = _aliases_of_loaded(model, required, out)
    missing = sorted(set(required) - set(out) - tied_aliases)
    if "added_tokens.output" in own and "added_tokens.output" not in out:
        report.kept_from_backbones.append(
            "added_tokens.output: not in the checkpoint (OpenFlamingo froze its random rows); mean-initialised"
        )
    if "added_tokens.output_bias" in own and "added_tokens.output_bias" not in out:
        report.kept_from_backbones.append("added_tokens.output_bias: not in the checkpoint; zero")
    if not is_full:
        report.kept_from_backbones.append(
            "language model and vision encoder weights (released format holds neither)"
        )
    if missing:
        raise InputError(
            f"{len(missing)} model key(s) have no source in the checkpoint: {', '.join(missing[:10])}"
        )


def _aliases_of_loaded(model: Flamingo, required: list[str], out: dict) -> set[str]:
    """Required keys whose tensor is shared with a key the conversion already fills (tied LM embeddings)."""
    params = model.state_dict(keep_vars=True)
    loaded = {id(params[k]) for k in out}
    return {k for k in required if k not in out and id(params[k]) in loaded}


def load_open_flamingo_state_dict(model: Flamingo, state: dict[str, torch.Tensor]) -> ConversionReport:
    """Convert and load into `model` in place; returns the report."""
    converted, report = convert_open_flamingo_state_dict(state, model)
    with torch.no_grad():
        params = model.state_dict(keep_vars=True)
        for key, tensor in converted.items():
            params[key].copy_(tensor)
    return report


def read_open_flamingo_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `checkpoint.pt` (weights only, never unpickling code) or `.safetensors`; training
    checkpoints ({"model_state_dict": ...}) and DDP's "module." prefix are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for non-weights pickles
            raise InputError(
                f"{path}: cannot be read as a weights-only checkpoint ({error.__class__.__name__})"
            ) from None
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a mapping of tensor names to tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def convert_open_flamingo_checkpoint(
    checkpoint: str | Path,
    language_model: str,
    vision_encoder: str,
    heads: int = 8,
    decoder_layers_path: str | None = None,
) -> tuple[Flamingo, ConversionReport]:
    """Build a Flamingo with the given backbones and the checkpoint's sizes, and load the checkpoint into it."""
    from ...backbones import resolve_vision_encoder

    state = read_open_flamingo_checkpoint(checkpoint)
    perceiver, cross_attention = infer_open_flamingo_hparams(state, heads=heads)
    config = FlamingoConfig(
        language_model=language_model,
        vision=resolve_vision_encoder(vision_encoder),
        perceiver=perceiver,
        cross_attention=cross_attention,
        decoder_layers_path=decoder_layers_path,
    )
    model = build_flamingo(config)
    return model, load_open_flamingo_state_dict(model, state)
