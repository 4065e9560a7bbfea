"""MosaicML's remote-code language models -> transformers' own `MptForCausalLM`, without running their code.

OpenFlamingo's 3B and 9B releases sit on language models that need `trust_remote_code=True`:
- MosaicGPT (`anas-awadalla/mpt-1b-redpajama-200b`, `-dolly`): MosaicML's April 2023 code, a flat config
  (`model_type = "mosaic_gpt"`, `attn_qk_ln`, `low_precision_layernorm`, `mlp_ratio`) and blocks named
  `ln_1 / attn / ln_2 / mlp.mlp_up / mlp.mlp_down`, final `ln_f`;
- MPT (`anas-awadalla/mpt-7b`): the May 2023 code, a nested `attn_config`, blocks named like transformers' port.
Only `config.json` and the weight files are read (weights with `weights_only=True`); the directory's Python files
are never imported. Every config field is mapped, ignored for a stated reason (initialisation, metadata) or refused
with a one-line error naming it; every weight maps to exactly one transformers key and all of them must be present.

One option transformers' MPT cannot express is used by a release: MosaicGPT-1B's QK LayerNorm (a LayerNorm over the
whole query and the whole key vector, after the fused QKV projection). It is implemented here exactly
(`add_qk_layernorm`) and `openflamingo` turns it on for any MPT config with `attn_config.qk_ln = true`; plain
transformers would ignore that field and the `attn.q_ln` / `attn.k_ln` weights (it warns that they were not used).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...errors import ExistingFileError, InputError, MissingFileError
from ..files import atomic_directory
from ..skeleton import parameters_on_meta

# Config fields that only shape training-time initialisation or describe the file: not needed to run the model.
_INIT_FIELDS = {
    "emb_init_std",
    "emb_init_uniform_lim",
    "fan_mode",
    "init_div_is_residual",
    "init_gain",
    "init_nonlinearity",
    "init_std",
    "param_init_fn",
    "init_config",
    "init_device",
}
_METADATA_FIELDS = {
    "_name_or_path",
    "architectures",
    "auto_map",
    "model_type",
    "tokenizer_name",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "verbose",
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


@dataclass
class MptConversionReport:
    source_format: str = ""  # "mosaic_gpt" or "mpt"
    ignored_fields: dict[str, str] = field(default_factory=dict)  # config field -> why it is not needed
    renamed: int = 0  # weights whose name changed
    tensors: int = 0
    tokenizer_files: list[str] = field(default_factory=list)
    qk_layernorm: bool = False

    def summary(self) -> str:
        lines = [
            f"{self.source_format} -> transformers MptForCausalLM: {self.tensors} tensors ({self.renamed} renamed)"
        ]
        lines += [f"  ignored {name}: {why}" for name, why in sorted(self.ignored_fields.items())]
        if self.qk_layernorm:
            lines.append("  QK LayerNorm (attn.q_ln / attn.k_ln): kept; openflamingo applies it when loading")
        lines.append(
            f"  tokenizer files copied: {', '.join(self.tokenizer_files) or 'none (add a tokenizer)'}"
        )
        return "\n".join(lines)


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    return json.loads(path.read_text())


def is_remote_code_mpt(directory: str | Path) -> bool:
    """True for a MosaicGPT / remote-code MPT directory (one that needs conversion), False otherwise."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    raw = json.loads(path.read_text())
    return raw.get("model_type") == "mosaic_gpt" or (raw.get("model_type") == "mpt" and "auto_map" in raw)


def _require(config_path: Path, name: str, value, allowed, why: str) -> None:
    if value not in allowed:
        raise InputError(f"{config_path}: {name} = {value!r} is not supported ({why})")


def _attention(config_path: Path, attn: dict, n_heads: int, report: MptConversionReport, prefix: str) -> dict:
    """The attention options both formats share, checked against what transformers' MPT computes."""
    known = {
        "alibi",
        "alibi_bias_max",
        "attn_impl",
        "attn_pdrop",
        "attn_type",
        "attn_uses_sequence_id",
        "clip_qkv",
        "prefix_lm",
        "qk_ln",
        "softmax_scale",
    }
    unknown = sorted(set(attn) - known)
    if unknown:
        raise InputError(
            f"{config_path}: unknown attention option(s) {', '.join(prefix + k for k in unknown)}"
        )
    _require(
        config_path, prefix + "alibi", attn.get("alibi", False), [True], "transformers' MPT always uses ALiBi"
    )
    # transformers builds its ALiBi slopes with the default maximum, whatever the config says
    _require(
        config_path, prefix + "alibi_bias_max", attn.get("alibi_bias_max", 8), [8], "transformers uses 8"
    )
    _require(
        config_path,
        prefix + "attn_type",
        attn.get("attn_type", "multihead_attention"),
        ["multihead_attention"],
        "transformers' MPT has multi-head attention only",
    )
    _require(
        config_path, prefix + "prefix_lm", attn.get("prefix_lm", False), [False], "causal attention only"
    )
    _require(
        config_path,
        prefix + "attn_uses_sequence_id",
        attn.get("attn_uses_sequence_id", False),
        [False],
        "no per-document attention",
    )
    _require(config_path, prefix + "attn_pdrop", attn.get("attn_pdrop", 0), [0], "dropout is not mapped")
    clip_qkv, qk_ln = attn.get("clip_qkv"), bool(attn.get("qk_ln", False))
    if clip_qkv is not None and qk_ln:
        # MosaicML clips before the QK LayerNorm; the LayerNorm here runs inside the QKV projection, before the clip
        raise InputError(
            f"{config_path}: clip_qkv together with qk_ln is not supported (the order would differ)"
        )
    # all attn_impl variants (torch, triton, flash) compute the same attention; transformers runs it in torch
    report.ignored_fields[prefix + "attn_impl"] = (
        "kernel choice only (transformers computes the same in torch)"
    )
    softmax_scale = attn.get("softmax_scale")
    return {
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_impl": "torch",
        "attn_pdrop": 0,  # an int: transformers 5 types it as int and rejects 0.0
        "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False,
        "clip_qkv": None if clip_qkv is None else float(clip_qkv),
        "prefix_lm": False,
        "qk_ln": qk_ln,
        "softmax_scale": None if softmax_scale is None else float(softmax_scale),
    }


def map_config(raw: dict, config_path: Path) -> tuple[dict, MptConversionReport]:
    """A MosaicGPT or remote-code MPT config -> a transformers MptConfig dict (field by field)."""
    report = MptConversionReport(source_format=raw.get("model_type", ""))
    if report.source_format == "mosaic_gpt":
        model_fields = {
            "d_model",
            "n_heads",
            "n_layers",
            "mlp_ratio",
            "max_seq_len",
            "vocab_size",
            "emb_pdrop",
            "resid_pdrop",
            "no_bias",
            "logit_scale",
            "embedding_fraction",
            "low_precision_layernorm",
        }
        attn_fields = {
            "alibi",
            "alibi_bias_max",
            "attn_impl",
            "attn_pdrop",
            "attn_uses_sequence_id",
            "prefix_lm",
            "softmax_scale",
        }
        renamed_attn = {"attn_clip_qkv": "clip_qkv", "attn_qk_ln": "qk_ln"}
        unknown = sorted(
            set(raw) - model_fields - attn_fields - set(renamed_attn) - _INIT_FIELDS - _METADATA_FIELDS
        )
        if unknown:
            raise InputError(f"{config_path}: unknown MosaicGPT config field(s) {', '.join(unknown)}")
        attn = {k: raw[k] for k in attn_fields if k in raw}
        attn.update({new: raw[old] for old, new in renamed_attn.items() if old in raw})
        expansion, norm_type = (
            raw.get("mlp_ratio", 4),
            ("low_precision_layernorm" if raw.get("low_precision_layernorm", False) else "layernorm"),
        )
        n_heads = raw["n_heads"]
        # MosaicGPT's ALiBi slopes are 2^(-8 i / n_heads); transformers (and later MPT) round n_heads up to a power
        # of two and interleave, which is the same only when n_heads is a power of two
        if n_heads & (n_heads - 1):
            raise InputError(
                f"{config_path}: n_heads = {n_heads} is not a power of two (MosaicGPT's ALiBi slopes differ)"
            )
        attention = _attention(config_path, attn, n_heads, report, prefix="")
    elif report.source_format == "mpt":
        model_fields = {
            "d_model",
            "n_heads",
            "n_layers",
            "expansion_ratio",
            "max_seq_len",
            "vocab_size",
            "emb_pdrop",
            "resid_pdrop",
            "no_bias",
            "logit_scale",
            "embedding_fraction",
            "norm_type",
            "learned_pos_emb",
            "attn_config",
            "fc_type",
            "ffn_config",
            "layer_norm_epsilon",
        }
        unknown = sorted(set(raw) - model_fields - _INIT_FIELDS - _METADATA_FIELDS)
        if unknown:
            raise InputError(f"{config_path}: unknown MPT config field(s) {', '.join(unknown)}")
        _require(config_path, "fc_type", raw.get("fc_type", "torch"), ["torch"], "plain linear layers only")
        ffn = raw.get("ffn_config", {"ffn_type": "mptmlp"})
        _require(config_path, "ffn_config.ffn_type", ffn.get("ffn_type"), ["mptmlp"], "the GELU MLP only")
        report.ignored_fields["learned_pos_emb"] = "unused with ALiBi (MPT builds no position embedding then)"
        expansion, norm_type, n_heads = (
            raw.get("expansion_ratio", 4),
            raw.get("norm_type", "low_precision_layernorm"),
            raw["n_heads"],
        )
        attention = _attention(
            config_path, raw.get("attn_config", {}), n_heads, report, prefix="attn_config."
        )
    else:
        raise InputError(
            f"{config_path}: model_type = {report.source_format!r}; expected 'mosaic_gpt' or 'mpt' (remote code)"
        )

    _require(config_path, "mlp_ratio/expansion_ratio", expansion, [4], "transformers' MPT MLP is 4 x d_model")
    _require(config_path, "no_bias", raw.get("no_bias", False), [True], "transformers' MPT has no biases")
    _require(
        config_path, "logit_scale", raw.get("logit_scale"), [None], "transformers' MPT does not scale logits"
    )
    _require(
        config_path,
        "embedding_fraction",
        raw.get("embedding_fraction", 1.0),
        [1, 1.0],
        "it only rescales gradients, which is not mapped",
    )
    _require(config_path, "emb_pdrop", raw.get("emb_pdrop", 0), [0], "dropout is not mapped")
    _require(config_path, "resid_pdrop", raw.get("resid_pdrop", 0), [0], "dropout is not mapped")
    # both compute a plain LayerNorm in fp32; low precision only changes the dtype of the computation under autocast
    _require(config_path, "norm type", norm_type, ["low_precision_layernorm", "layernorm"], "LayerNorm only")
    for name in sorted(set(raw) & _INIT_FIELDS):
        report.ignored_fields[name] = "initialisation only"
    config = {
        "architectures": ["MptForCausalLM"],
        "model_type": "mpt",
        "d_model": raw["d_model"],
        "n_heads": n_heads,
        "n_layers": raw["n_layers"],
        "expansion_ratio": 4,
        "max_seq_len": raw["max_seq_len"],
        "vocab_size": raw["vocab_size"],
        "resid_pdrop": 0.0,
        "emb_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,  # MosaicML's LayerNorms use torch's default
        "learned_pos_emb": False,
        "attn_config": attention,
        "init_device": "cpu",
        "logit_scale": None,
        "no_bias": True,
        "embedding_fraction": 1.0,
        "norm_type": norm_type,
        "use_cache": True,
        "tie_word_embeddings": True,  # both tie the output layer to wte
    }
    report.qk_layernorm = attention["qk_ln"]
    return config, report


# source name pattern -> transformers name; MosaicGPT's names first, the later ones are already transformers'
_RENAMES = [
    (r"transformer\.blocks\.(\d+)\.(?:ln_1|norm_1)\.weight", r"transformer.blocks.\1.norm_1.weight"),
    (r"transformer\.blocks\.(\d+)\.(?:ln_2|norm_2)\.weight", r"transformer.blocks.\1.norm_2.weight"),
    (
        r"transformer\.blocks\.(\d+)\.attn\.(Wqkv|out_proj|q_ln|k_ln)\.weight",
        r"transformer.blocks.\1.attn.\2.weight",
    ),
    (
        r"transformer\.blocks\.(\d+)\.(?:mlp\.mlp_up|ffn\.up_proj)\.weight",
        r"transformer.blocks.\1.ffn.up_proj.weight",
    ),
    (
        r"transformer\.blocks\.(\d+)\.(?:mlp\.mlp_down|ffn\.down_proj)\.weight",
        r"transformer.blocks.\1.ffn.down_proj.weight",
    ),
    (r"transformer\.(?:ln_f|norm_f)\.weight", r"transformer.norm_f.weight"),
    (r"transformer\.wte\.weight", r"transformer.wte.weight"),
]


def expected_keys(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a converted MPT holds, with its shape (the output layer is tied to wte and not stored)."""
    d, vocab = config["d_model"], config["vocab_size"]
    shapes = {"transformer.wte.weight": (vocab, d), "transformer.norm_f.weight": (d,)}
    for i in range(config["n_layers"]):
        block = f"transformer.blocks.{i}."
        shapes |= {
            block + "norm_1.weight": (d,),
            block + "attn.Wqkv.weight": (3 * d, d),
            block + "attn.out_proj.weight": (d, d),
            block + "norm_2.weight": (d,),
            block + "ffn.up_proj.weight": (4 * d, d),
            block + "ffn.down_proj.weight": (d, 4 * d),
        }
        if config["attn_config"]["qk_ln"]:
            shapes |= {block + "attn.q_ln.weight": (d,), block + "attn.k_ln.weight": (d,)}
    return shapes


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: *.safetensors if there are any, else pytorch_model*.bin (read with
    weights_only=True, so no pickled code runs)."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise MissingFileError(f"{directory}: no *.safetensors or pytorch_model*.bin weight files")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(path)
        else:
            try:
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # torch raises several types for non-weights pickles
                raise InputError(
                    f"{path}: cannot be read as a weights-only checkpoint ({error.__class__.__name__})"
                ) from None
        duplicated = sorted(set(part) & set(state))
        if duplicated:
            raise InputError(f"{path}: key(s) already in another weight file: {', '.join(duplicated[:5])}")
        state.update(part)
    return state


def convert_weights(
    state: dict[str, torch.Tensor], config: dict, source: Path
) -> tuple[dict[str, torch.Tensor], int]:
    """Rename every tensor to its transformers key; unknown, duplicated, missing or mis-shaped tensors are errors."""
    expected = expected_keys(config)
    out: dict[str, torch.Tensor] = {}
    unknown, renamed = [], 0
    for key, tensor in state.items():
        if key == "lm_head.weight" and torch.equal(tensor, state.get("transformer.wte.weight", tensor + 1)):
            continue  # a tied copy of wte that some exports store
        target = next(
            (re.sub(pattern, repl, key) for pattern, repl in _RENAMES if re.fullmatch(pattern, key)), None
        )
        if target is None or target not in expected:
            unknown.append(key)
            continue
        if target in out:
            raise InputError(f"{source}: two tensors map to {target}")
        if tuple(tensor.shape) != expected[target]:
            raise InputError(f"{source}: {key} has shape {tuple(tensor.shape)}; expected {expected[target]}")
        out[target] = tensor
        renamed += target != key
    if unknown:
        raise InputError(f"{source}: {len(unknown)} unknown weight(s): {', '.join(sorted(unknown)[:10])}")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise InputError(f"{source}: {len(missing)} missing weight(s): {', '.join(missing[:10])}")
    return out, renamed


def convert_mosaic_gpt(
    directory: str | Path, out: str | Path, overwrite: bool = False
) -> MptConversionReport:
    """Write a transformers MPT directory (config.json, model.safetensors, tokenizer files) at `out`."""
    from safetensors.torch import save_file

    directory, out = Path(directory), Path(out)
    config, report = map_config(read_config(directory), directory / "config.json")
    weights, report.renamed = convert_weights(read_weights(directory), config, directory)
    report.tensors = len(weights)
    # the dtype the tensors are stored in (transformers 5 loads in it): the released configs do not always say it
    config["torch_dtype"] = str(weights["transformer.wte.weight"].dtype).removeprefix("torch.")
    if out.exists() and not overwrite:
        raise ExistingFileError(f"{out} exists; pass --overwrite to replace it")
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(
            {k: v.contiguous() for k, v in weights.items()},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        for name in _TOKENIZER_FILES:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, tmp / name)
                report.tokenizer_files.append(name)
    return report


# --- QK LayerNorm, the one MosaicGPT option transformers' MPT lacks ---------------------------------------------


def uses_qk_layernorm(config) -> bool:
    """True for an MPT config (object or dict) whose attention normalises queries and keys."""
    as_dict = config if isinstance(config, dict) else config.to_dict()
    attn = as_dict.get("attn_config") or {}
    return as_dict.get("model_type") == "mpt" and bool(attn.get("qk_ln", False))


def _normalize_query_key(attn: nn.Module, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on `attn.Wqkv`: MosaicML's `query = q_ln(query); key = k_ln(key)` right after the fused
    projection (over the whole d_model vector, before the split into heads)."""
    query, key, value = output.chunk(3, dim=-1)
    return torch.cat([attn.q_ln(query), attn.k_ln(key), value], dim=-1)


def add_qk_layernorm(lm: nn.Module) -> None:
    """Give every attention of a transformers MPT model `q_ln` / `k_ln` (LayerNorm without bias, as MosaicML's
    no_bias models have) applied by a forward hook on its QKV projection. The new weights start at 1."""
    config = lm.config
    for block in lm.transformer.blocks:
        attn = block.attn
        if hasattr(attn, "q_ln"):
            raise InputError("the language model already has QK LayerNorm")
        for name in ("q_ln", "k_ln"):
            norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=False)
            attn.add_module(name, norm.to(attn.Wqkv.weight.device, attn.Wqkv.weight.dtype))
        attn.Wqkv.register_forward_hook(functools.partial(_normalize_query_key, attn))


def load_mpt_with_qk_layernorm(directory: Path):
    """An MPT directory with `attn_config.qk_ln = true`: build it, add the QK LayerNorm, load every tensor strictly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with parameters_on_meta():  # every parameter comes from the files: build none (model/skeleton.py)
        lm = AutoModelForCausalLM.from_config(config)
        add_qk_layernorm(lm)
    state = read_weights(directory)
    own = lm.state_dict()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", True) else set()
    missing = sorted(set(own) - set(state) - tied)
    unknown = sorted(set(state) - set(own))
    if missing or unknown:
        raise InputError(
            f"{directory}: weights do not match the QK-LayerNorm MPT: missing {missing[:5]}, unknown {unknown[:5]}"
        )
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise InputError(
                f"{directory}: {key} has shape {tuple(tensor.shape)}; expected {tuple(own[key].shape)}"
            )
    lm.load_state_dict(state, strict=False, assign=True)
    if tied:
        lm.tie_weights()  # the output layer is wte itself again, not the meta tensor it was built with
    return lm
