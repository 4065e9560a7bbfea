"""IDEFICS (HuggingFaceM4/idefics-9b, -80b and their -instruct versions) -> this library's Flamingo, strictly.

IDEFICS is a Flamingo with other block insides (Laurençon et al. 2023; transformers' `IdeficsForVisionText2Text`):
a CLIP ViT-H/14 whose last hidden state (all 257 tokens, CLS first, before the post-LayerNorm) feeds a perceiver
with a ReLU feed-forward, and RMSNorm + SwiGLU gated cross-attention blocks before the first decoder layer of every
`cross_layer_interval` of a stock LLaMA. All of it is a setting of `FlamingoConfig` (see `idefics_flamingo_config`),
so the converted model is an ordinary openflamingo model: it trains, evaluates and serves like the others.

The source is a directory laid out as the Hub repos: `config.json` (nested `vision_config` / `perceiver_config`, or
the older flat `vision_*` / `resampler_*` keys), safetensors weights (one file or shards with their index), the
tokenizer and `preprocessor_config.json`. Every config field is mapped, ignored for a stated reason or refused;
every tensor maps to exactly one target; pickled weights (`*.bin`) are refused. Any mismatch is a one-line error.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import ExistingFileError
from ..config import FlamingoConfig
from ..cross_attention import CrossAttentionConfig
from ..language import SpecialTokens
from ..perceiver import PerceiverConfig
from ..prompt_format import PromptFormat
from ..vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionConfig

IMAGE_TOKEN = "<image>"
AROUND_IMAGE_TOKEN = "<fake_token_around_image>"
# The -instruct models' dialogue format (their model cards): "User:<image>question<end_of_utterance>\nAssistant:".
INSTRUCT_FORMAT = PromptFormat(
    template="User:{images}{question}<end_of_utterance>\nAssistant: {answer}<end_of_utterance>\n",
    stop=["<end_of_utterance>"],
    answer_end="",
)

# Flat (older) config.json keys -> (sub-config, key there)
FLAT_KEYS = {
    "vision_embed_dim": ("vision_config", "embed_dim"),
    "vision_image_size": ("vision_config", "image_size"),
    "vision_intermediate_size": ("vision_config", "intermediate_size"),
    "vision_patch_size": ("vision_config", "patch_size"),
    "vision_num_attention_heads": ("vision_config", "num_attention_heads"),
    "vision_num_hidden_layers": ("vision_config", "num_hidden_layers"),
    "vision_hidden_act": ("vision_config", "hidden_act"),
    "vision_layer_norm_eps": ("vision_config", "layer_norm_eps"),
    "vision_num_channels": ("vision_config", "num_channels"),
    "vision_model_name": ("vision_config", "vision_model_name"),
    "vision_model_params": ("vision_config", "vision_model_params"),
    "resampler_n_latents": ("perceiver_config", "resampler_n_latents"),
    "resampler_depth": ("perceiver_config", "resampler_depth"),
    "resampler_n_heads": ("perceiver_config", "resampler_n_heads"),
    "resampler_head_dim": ("perceiver_config", "resampler_head_dim"),
    "qk_layer_norms_perceiver": ("perceiver_config", "qk_layer_norms_perceiver"),
}

# Fields that do not change what the model computes, and why they are not carried over.
WHY_IGNORED = {
    "freeze_text_layers": "what trains is the recipe's choice (train_language_model, lora, ...)",
    "freeze_text_module_exceptions": "what trains is the recipe's choice",
    "freeze_lm_head": "what trains is the recipe's choice",
    "freeze_vision_layers": "what trains is the recipe's choice (train_vision_encoder)",
    "freeze_vision_module_exceptions": "what trains is the recipe's choice",
    "use_cache": "generation always uses the KV cache",
    "initializer_range": "initialisation only; every weight comes from the checkpoint",
    "initializer_factor": "initialisation only",
    "torch_dtype": "the tensors keep the dtype they are stored in; loading builds fp32 and casts at run time",
    "dtype": "the tensors keep the dtype they are stored in",
    "vision_model_name": "the vision tower's weights are in the checkpoint",
    "vision_model_params": "loading options of the original training code; the weights are in the checkpoint",
    "attention_dropout": "must be 0 (checked); openflamingo's blocks have no dropout",
    "architectures": "metadata",
    "transformers_version": "metadata",
    "_name_or_path": "metadata",
}
TOP_LEVEL = {
    "vocab_size", "additional_vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings", "alpha_initializer",
    "alphas_initializer_range", "alpha_type", "cross_layer_interval", "qk_layer_norms", "use_resampler",
    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "dropout", "rope_theta",
    "rope_scaling", "rope_parameters", "vision_config", "perceiver_config",
}  # fmt: skip
VISION_KEYS = {
    "embed_dim", "image_size", "intermediate_size", "patch_size", "num_attention_heads", "num_hidden_layers",
    "hidden_act", "layer_norm_eps", "num_channels", "attention_dropout",
}  # fmt: skip
PERCEIVER_KEYS = {
    "use_resampler", "resampler_n_latents", "resampler_depth", "resampler_n_heads", "resampler_head_dim",
    "qk_layer_norms_perceiver",
}  # fmt: skip
# Keys transformers writes into every config.json (PretrainedConfig's own): generation and export settings that do
# not describe the architecture.
GENERIC = {
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type", "model_type",
}  # fmt: skip


class IdeficsError(ValueError):
    """A source directory this converter cannot convert exactly; the message names the file and field."""


@dataclass
class IdeficsReport:
    source: str = ""
    mapped: Counter = field(default_factory=Counter)  # target group -> tensors
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why
    ignored: dict[str, str] = field(default_factory=dict)  # config field -> why

    def summary(self) -> str:
        lines = [f"IDEFICS checkpoint {self.source} converted:"]
        lines += [f"  {group}: {n} tensors" for group, n in sorted(self.mapped.items())]
        lines += [f"  dropped {key}: {why}" for key, why in sorted(self.dropped.items())]
        lines += [f"  config {key} not carried over: {why}" for key, why in sorted(self.ignored.items())]
        return "\n".join(lines)


# ----- config ----------------------------------------------------------------------------------------------------
def read_idefics_config(directory: Path, report: IdeficsReport | None = None) -> dict[str, Any]:
    """config.json in the nested layout, whichever layout the file uses; unknown fields are errors."""
    path = directory / "config.json"
    if not path.is_file():
        raise IdeficsError(f"{path}: not found; the source must be an IDEFICS model directory")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "idefics":
        raise IdeficsError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'idefics'")
    config: dict[str, Any] = {"vision_config": {}, "perceiver_config": {}}
    for key, value in raw.items():
        if key in FLAT_KEYS:
            section, name = FLAT_KEYS[key]
            config[section][name] = value
        elif key in ("vision_config", "perceiver_config"):
            if not isinstance(value, dict):
                raise IdeficsError(f"{path}: {key} must be an object")
            config[key].update(value)
        else:
            config[key] = value
    _check_known(path, "", config, TOP_LEVEL, report)
    _check_known(path, "vision_config.", config["vision_config"], VISION_KEYS, report)
    _check_known(path, "perceiver_config.", config["perceiver_config"], PERCEIVER_KEYS, report)
    return config


def _check_known(
    path: Path, prefix: str, section: dict, known: set[str], report: IdeficsReport | None
) -> None:
    for key in list(section):
        if key in known:
            continue
        if key in WHY_IGNORED or key in GENERIC:
            section.pop(key)
            if report is not None and key in WHY_IGNORED:
                report.ignored[prefix + key] = WHY_IGNORED[key]
            continue
        raise IdeficsError(f"{path}: unknown field {prefix}{key}; this converter knows IDEFICS' fields only")


def _require(path: Path, name: str, value, allowed) -> None:
    if value not in allowed:
        raise IdeficsError(
            f"{path}: {name}={value!r} is not supported; expected {' or '.join(map(repr, allowed))}"
        )


def idefics_flamingo_config(
    directory: Path, config: dict[str, Any], tokenizer, instruct: bool = False
) -> FlamingoConfig:
    """The FlamingoConfig that computes what transformers' IdeficsForVisionText2Text computes; `instruct` records
    the -instruct models' prompt format (else OpenFlamingo's few-shot one)."""
    path = directory / "config.json"
    vision, perceiver = config["vision_config"], config["perceiver_config"]
    use_resampler = {config.get("use_resampler"), perceiver.get("use_resampler")} - {None}
    _require(path, "use_resampler", use_resampler, [{True}])
    _require(path, "dropout", config.get("dropout", 0.0), [0, 0.0])
    _require(path, "vision_config.attention_dropout", vision.get("attention_dropout", 0.0), [0, 0.0])
    _require(path, "hidden_act", config.get("hidden_act", "silu"), ["silu"])
    _require(path, "alpha_type", config.get("alpha_type", "float"), ["float", "vector"])
    alpha_init = config.get("alpha_initializer", "zeros")
    _require(path, "alpha_initializer", alpha_init, ["zeros", "ones", "normal", "gaussian", "random"])
    _require(path, "tie_word_embeddings", config.get("tie_word_embeddings", False), [False])
    _require(path, "additional_vocab_size", config.get("additional_vocab_size"), [2])
    rope = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    _require(path, "rope_theta", float(theta), [10000.0])
    _require(path, "rope type", rope.get("rope_type", "default"), ["default"])
    _require(path, "rope_scaling", config.get("rope_scaling"), [None])

    hidden, heads = config.get("hidden_size", 4096), config.get("num_attention_heads", 32)
    eps = config.get("rms_norm_eps", 1e-6)
    vocab = config.get("vocab_size", 32000)
    _check_tokenizer(directory, tokenizer, vocab)
    language_model_config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": config.get("intermediate_size", 11008),
        "num_hidden_layers": config.get("num_hidden_layers", 32),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
        "bos_token_id": config.get("bos_token_id", 1),
        "eos_token_id": config.get("eos_token_id", 2),
        "pad_token_id": config.get("pad_token_id", 0),
        "tie_word_embeddings": False,
    }
    clip = {
        "hidden_size": vision.get("embed_dim", 768),
        "intermediate_size": vision.get("intermediate_size", 5120),
        "num_hidden_layers": vision.get("num_hidden_layers", 32),
        "num_attention_heads": vision.get("num_attention_heads", 16),
        "image_size": vision.get("image_size", 224),
        "patch_size": vision.get("patch_size", 14),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-5),
        "num_channels": vision.get("num_channels", 3),
    }
    _check_preprocessor(directory, clip["image_size"])
    normal = alpha_init in ("normal", "gaussian", "random")
    return FlamingoConfig(
        language_model_config=language_model_config,
        tokenizer=str(directory),
        vision=VisionConfig("hf_clip", config=clip, keep_cls=True, resize="squash"),
        perceiver=PerceiverConfig(
            depth=perceiver.get("resampler_depth", 6),
            num_latents=perceiver.get("resampler_n_latents", 64),
            heads=perceiver.get("resampler_n_heads", 16),
            dim_head=perceiver.get("resampler_head_dim", 96),
            ff_mult=4,
            activation="relu",
            qk_norm=perceiver.get("qk_layer_norms_perceiver", False),
        ),
        cross_attention=CrossAttentionConfig(
            every_n_layers=config.get("cross_layer_interval", 1),
            group_position="first",
            heads=heads,
            dim_head=hidden // heads,
            feed_forward="swiglu",
            ff_dim=config.get("intermediate_size", 11008),
            norm="rmsnorm",
            norm_eps=eps,
            qk_norm=config.get("qk_layer_norms", False),
            gate="vector" if config.get("alpha_type", "float") == "vector" else "scalar",
            gate_init=1.0 if alpha_init == "ones" else 0.0,
            gate_init_std=config.get("alphas_initializer_range", 0.0) if normal else 0.0,
            media_ends_at_eos=True,
        ),
        special_tokens=SpecialTokens(
            media=IMAGE_TOKEN,
            end_of_chunk=tokenizer.eos_token,
            added=[AROUND_IMAGE_TOKEN, IMAGE_TOKEN],
            around_media=AROUND_IMAGE_TOKEN,
        ),
        prompt_format=INSTRUCT_FORMAT if instruct else PromptFormat(),
    )


def _check_tokenizer(directory: Path, tokenizer, vocab: int) -> None:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (AROUND_IMAGE_TOKEN, IMAGE_TOKEN)]
    if ids != [vocab, vocab + 1] or len(tokenizer) != vocab + 2:
        raise IdeficsError(
            f"{directory}: the tokenizer must end with {AROUND_IMAGE_TOKEN} = {vocab} and {IMAGE_TOKEN} = {vocab + 1} "
            f"after the {vocab} LM tokens; it has them at {ids} of {len(tokenizer)}"
        )
    if tokenizer.eos_token is None or tokenizer.pad_token is None:
        raise IdeficsError(f"{directory}: the tokenizer needs an eos_token and a pad_token")


def _check_preprocessor(directory: Path, image_size: int) -> None:
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return  # IDEFICS' processor defaults: what the vision config states, CLIP's mean and std
    data = json.loads(path.read_text())
    size = data.get("image_size", data.get("size", {}).get("height", image_size))
    if size != image_size:
        raise IdeficsError(f"{path}: image_size {size} != the vision config's {image_size}")
    for name, expected in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        value = data.get(name, expected)
        if not torch.allclose(
            torch.tensor(value, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
        ):
            raise IdeficsError(
                f"{path}: {name}={value} differs from CLIP's {list(expected)}, which is supported"
            )


# ----- weights ---------------------------------------------------------------------------------------------------
def read_idefics_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file(s); a directory with only pickled weights is refused."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise IdeficsError(f"{index}: shard(s) {', '.join(missing)} not found")
        files = [directory / s for s in shards]
    if not files:
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        if pickles:
            raise IdeficsError(
                f"{directory}: holds only pickled weights ({', '.join(pickles)}), which can run code when read; "
                "download the repo's *.safetensors files instead"
            )
        raise IdeficsError(f"{directory}: no *.safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, tensor in load_file(file).items():
            if key in state:
                raise IdeficsError(f"{file}: {key} is also in another shard")
            state[key] = tensor
    return state


def _target(key: str, interval: int) -> tuple[str, str] | None:
    """(our key, group) for one IDEFICS key; None when it is not ours to map directly."""
    for prefix, ours, group in (
        ("model.vision_model.", "vision_encoder.vision_model.", "vision encoder"),
        ("model.layers.", "language_model.model.layers.", "language model"),
        ("model.norm.", "language_model.model.norm.", "language model"),
    ):
        if key.startswith(prefix):
            return ours + key[len(prefix) :], group
    if key in DIRECT:
        return DIRECT[key]
    parts = key.split(".")
    if key.startswith("model.perceiver_resampler.blocks.") and len(parts) >= 7:
        layer, part, rest = parts[3], parts[4], ".".join(parts[5:])
        names = PERCEIVER_ATTENTION if part == "0" else PERCEIVER_FEED_FORWARD
        name, leaf = rest.rsplit(".", 1)
        if name in names:
            return f"perceiver.layers.{layer}.{names[name]}.{leaf}", "perceiver"
    if key.startswith("model.gated_cross_attn_layers.") and len(parts) >= 4:
        block, rest = int(parts[2]), ".".join(parts[3:])
        prefix = f"cross_attn_blocks.{block * interval}."
        if rest in GATES:
            return prefix + GATES[rest], "cross-attention blocks"
        name, leaf = rest.rsplit(".", 1)
        if name in CROSS_ATTENTION:
            return f"{prefix}{CROSS_ATTENTION[name]}.{leaf}", "cross-attention blocks"
    return None


# IDEFICS keys that map one to one, outside the prefixes and layer patterns below
DIRECT = {
    "model.embed_tokens.weight": ("language_model.model.embed_tokens.weight", "language model"),
    "lm_head.weight": ("language_model.lm_head.weight", "language model"),
    "model.embed_tokens.additional_embedding.weight": ("added_tokens.input", "added tokens"),
    "lm_head.additional_fc.weight": ("added_tokens.output", "added tokens"),
    "model.perceiver_resampler.latents": ("perceiver.latents", "perceiver"),
    "model.perceiver_resampler.layer_norm.weight": ("perceiver.norm.weight", "perceiver"),
    "model.perceiver_resampler.layer_norm.bias": ("perceiver.norm.bias", "perceiver"),
}
PERCEIVER_ATTENTION = {
    "context_layer_norm": "attn.norm_media",
    "latents_layer_norm": "attn.norm_latents",
    "q_proj": "attn.to_q",
    "output_proj": "attn.to_out",
    "q_layer_norm": "attn.q_norm",
    "k_layer_norm": "attn.k_norm",
}
PERCEIVER_FEED_FORWARD = {"ln": "ff.norm", "fc": "ff.fc1", "c_proj": "ff.fc2"}
CROSS_ATTENTION = {
    "input_layernorm": "attn.norm",
    "cross_attn.q_proj": "attn.to_q",
    "cross_attn.o_proj": "attn.to_out",
    "cross_attn.q_layer_norm": "attn.q_norm",
    "cross_attn.k_layer_norm": "attn.k_norm",
    "post_attention_layernorm": "ff.norm",
    "mlp.gate_proj": "ff.gate_proj",
    "mlp.up_proj": "ff.up_proj",
    "mlp.down_proj": "ff.down_proj",
}
GATES = {"alpha_cross_attn": "attn_gate", "alpha_dense": "ff_gate"}
# Keys and values are one projection here (to_kv = [k; v]); IDEFICS keeps two.
SEPARATE_KV = (
    (re.compile(r"model\.perceiver_resampler\.blocks\.(\d+)\.0\.([kv])_proj\.weight"), "perceiver.layers.{}", "perceiver"),
    (re.compile(r"model\.gated_cross_attn_layers\.(\d+)\.cross_attn\.([kv])_proj\.weight"), "cross_attn_blocks.{}", "cross-attention blocks"),
)  # fmt: skip


def convert_idefics_state_dict(
    state: dict[str, torch.Tensor], interval: int, report: IdeficsReport
) -> dict[str, torch.Tensor]:
    """IDEFICS tensor names -> ours; a key this converter does not know is an error naming it."""
    out: dict[str, torch.Tensor] = {}
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        separate = next(((m, t, g) for p, t, g in SEPARATE_KV if (m := p.fullmatch(key))), None)
        if separate is not None:
            match, module, group = separate
            index = int(match.group(1)) * (interval if module.startswith("cross") else 1)
            halves.setdefault(f"{module.format(index)}.attn.to_kv.weight", {})[match.group(2)] = (key, tensor)
            report.mapped[group] += 1
            continue
        if key.endswith(("rotary_emb.inv_freq", "embeddings.position_ids")):
            report.dropped[key] = "recomputed, not a weight"
            continue
        target = _target(key, interval)
        if target is None:
            raise IdeficsError(f"weights: unknown tensor {key}")
        name, group = target
        if name.endswith(("attn_gate", "ff_gate")):
            tensor = tensor.reshape(-1)  # IDEFICS' vector gates are (1, 1, D), scalar ones (1,)
        out[name] = tensor
        report.mapped[group] += 1
    for target, pair in halves.items():
        if set(pair) != {"k", "v"}:
            have = next(iter(pair.values()))[0]
            raise IdeficsError(f"weights: {have} has no {'v' if 'k' in pair else 'k'}_proj partner")
        out[target] = torch.cat([pair["k"][1], pair["v"][1]])
    return out


# ----- the whole directory ---------------------------------------------------------------------------------------
def convert_idefics(
    source: str | Path,
    out: str | Path,
    overwrite: bool = False,
    instruct: bool | None = None,
    dtype: torch.dtype | None = None,
) -> IdeficsReport:
    """Convert an IDEFICS directory into a self-contained openflamingo checkpoint at `out` (LM, vision tower and
    the Flamingo parts in one model.safetensors). `instruct` (default: whether the directory's name says
    "instruct") records the -instruct models' prompt format. The tensors keep their stored dtype (the Hub's are
    bf16) unless `dtype` is given.

    The model is built without weights (model/skeleton.py) and the checkpoint's tensors become its parameters, so
    memory holds one copy of the weights (the one `save_pretrained` writes), not a random fp32 model besides."""
    from ..build import build_flamingo, load_tokenizer
    from ..checkpoint import save_pretrained, stored_keys
    from ..skeleton import assign_weights, parameters_on_meta

    source, out = Path(source), Path(out)
    if out.exists() and not overwrite:
        raise ExistingFileError(f"{out} exists; pass --overwrite to replace it")
    report = IdeficsReport(source=str(source))
    config = read_idefics_config(source, report)
    tokenizer = load_tokenizer(source)
    if instruct is None:
        instruct = "instruct" in source.resolve().name.lower()
    model_config = idefics_flamingo_config(source, config, tokenizer, instruct)
    state = read_idefics_weights(source)
    converted = convert_idefics_state_dict(state, model_config.cross_attention.every_n_layers, report)
    if dtype is not None:
        converted = {key: tensor.to(dtype) for key, tensor in converted.items()}
    with parameters_on_meta():
        model = build_flamingo(model_config)
    expected = stored_keys(model.config, model.state_dict(), True, model.decoder_layers_path)
    assign_weights(model, converted, expected, source=source)
    save_pretrained(model, out, include_backbones=True, overwrite=overwrite)
    return report
