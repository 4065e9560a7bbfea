"""Write tests/fixtures/mpt_parity/: what MosaicML's own MPT code computes for reduced copies of the language models
under OpenFlamingo's 3B and 9B releases (see tools/mpt_parity/README.md).

    /tmp/mpt-ref-venv/bin/python tools/mpt_parity/make_fixtures.py --out tests/fixtures/mpt_parity

Runs only in the reference venv (llm-foundry==0.1.0 from PyPI, installed --no-deps; see setup_reference.sh). The
openflamingo library never imports this code.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "parity"))
import make_fixtures as parity  # noqa: E402  (installs the torchvision stub before transformers is imported)
import torch  # noqa: E402

SEED = 0
VOCAB = 256
BATCH, SEQ, PAD = 2, 12, 3  # row 1 is left-padded by PAD tokens
PROMPT, NEW_TOKENS = 8, 6
LN_NOISE = 0.2  # LayerNorm weights start at 1; noise makes a swapped or dropped norm visible

# The released configs (config.json of each LM as published), reduced in depth, width and vocabulary only; every
# option is kept. MosaicGPT's head count stays 16: its ALiBi slopes depend on it.
RELEASES = {
    "mosaic_gpt_1b": {
        "release": "anas-awadalla/mpt-1b-redpajama-200b (OpenFlamingo-3B-vitl-mpt1b)",
        "config": {
            "_name_or_path": "mosaicml/mpt-1b-redpajama-200b",
            "alibi": True,
            "alibi_bias_max": 8,
            "architectures": ["MosaicGPT"],
            "attn_clip_qkv": None,
            "attn_impl": "torch",
            "attn_pdrop": 0,
            "attn_qk_ln": True,
            "attn_uses_sequence_id": False,
            "auto_map": {
                "AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
                "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT",
            },
            "d_model": 64,  # released: 2048
            "emb_init_std": None,
            "emb_init_uniform_lim": None,
            "emb_pdrop": 0,
            "embedding_fraction": 1.0,
            "fan_mode": "fan_in",
            "init_device": "cpu",
            "init_div_is_residual": True,
            "init_gain": 0,
            "init_nonlinearity": "relu",
            "init_std": 0.02,
            "logit_scale": None,
            "low_precision_layernorm": True,
            "max_seq_len": 2048,
            "mlp_ratio": 4,
            "model_type": "mosaic_gpt",
            "n_heads": 16,
            "n_layers": 2,  # released: 24
            "no_bias": True,
            "param_init_fn": "kaiming_normal_",
            "prefix_lm": False,
            "resid_pdrop": 0,
            "softmax_scale": None,
            "tokenizer_name": "EleutherAI/gpt-neox-20b",
            "torch_dtype": "float32",
            "transformers_version": "4.27.4",
            "use_cache": False,
            "verbose": 0,
            "vocab_size": VOCAB,  # released: 50432
        },
    },
    "mpt_7b": {
        "release": "anas-awadalla/mpt-7b = mosaicml/mpt-7b (OpenFlamingo-9B-vitl-mpt7b)",
        "config": {
            "architectures": ["MPTForCausalLM"],
            "attn_config": {
                "alibi": True,
                "alibi_bias_max": 8,
                "attn_impl": "torch",
                "attn_pdrop": 0,
                "attn_type": "multihead_attention",
                "attn_uses_sequence_id": False,
                "clip_qkv": None,
                "prefix_lm": False,
                "qk_ln": False,
                "softmax_scale": None,
            },
            "auto_map": {
                "AutoConfig": "configuration_mpt.MPTConfig",
                "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
            },
            "d_model": 64,  # released: 4096
            "emb_pdrop": 0,
            "embedding_fraction": 1.0,
            "expansion_ratio": 4,
            "init_config": {
                "emb_init_std": None,
                "emb_init_uniform_lim": None,
                "fan_mode": "fan_in",
                "init_div_is_residual": True,
                "init_gain": 0,
                "init_nonlinearity": "relu",
                "init_std": 0.02,
                "name": "kaiming_normal_",
                "verbose": 0,
            },
            "init_device": "cpu",
            "learned_pos_emb": True,
            "logit_scale": None,
            "max_seq_len": 2048,
            "model_type": "mpt",
            "n_heads": 32,
            "n_layers": 2,  # released: 32
            "no_bias": True,
            "norm_type": "low_precision_layernorm",
            "resid_pdrop": 0,
            "tokenizer_name": "EleutherAI/gpt-neox-20b",
            "torch_dtype": "bfloat16",
            "transformers_version": "4.28.1",
            "use_cache": False,
            "verbose": 0,
            "vocab_size": VOCAB,  # released: 50432
        },
    },
}

# llm-foundry's MPT names -> MosaicGPT's (the April 2023 code the 1B was exported with: ln_1 / ln_2 / ln_f and
# mlp.mlp_up / mlp.mlp_down; attention modules are named alike)
MOSAIC_GPT_NAMES = [
    (".norm_1.", ".ln_1."),
    (".norm_2.", ".ln_2."),
    (".ffn.up_proj.", ".mlp.mlp_up."),
    (".ffn.down_proj.", ".mlp.mlp_down."),
    ("transformer.norm_f.", "transformer.ln_f."),
]


@functools.cache
def import_llmfoundry_mpt():
    """llm-foundry 0.1.0's MPT classes without composer and its training stack: the packages' __init__ files
    (which import them) are skipped and the few names modeling_mpt imports for its Composer wrapper are stubs."""
    root = Path(importlib.util.find_spec("llmfoundry").submodule_search_locations[0])
    for name, path in [("llmfoundry", root), ("llmfoundry.models", root / "models")]:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module

    class ComposerStub:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("composer is not installed in the reference venv")

    def stub_getattr(name):
        if name[:1].isupper():
            return ComposerStub
        raise AttributeError(name)

    for name in ("composer", "composer.metrics", "composer.metrics.nlp", "composer.models"):
        module = types.ModuleType(name)
        module.__getattr__ = stub_getattr
        module.__path__ = []
        sys.modules[name] = module
    # imports transformers internals removed since 4.28; only used for prefix-LM conversion of other models
    prefix_lm = types.ModuleType("llmfoundry.models.utils.hf_prefixlm_converter")
    prefix_lm.add_bidirectional_mask_if_missing = prefix_lm.convert_hf_causal_lm_to_prefix_lm = None
    sys.modules[prefix_lm.__name__] = prefix_lm
    from llmfoundry.models.mpt.configuration_mpt import MPTConfig
    from llmfoundry.models.mpt.modeling_mpt import MPTForCausalLM

    return MPTConfig, MPTForCausalLM


def reference_config(released: dict, MPTConfig):
    """llm-foundry's MPTConfig for a released config (MosaicGPT's flat fields become MPT's attn_config)."""
    if released["model_type"] == "mpt":
        fields = {k: v for k, v in released.items() if k not in ("architectures", "auto_map", "model_type")}
        return MPTConfig(**fields)
    attn = {
        "attn_type": "multihead_attention",
        "attn_pdrop": released["attn_pdrop"],
        "attn_impl": released["attn_impl"],
        "qk_ln": released["attn_qk_ln"],
        "clip_qkv": released["attn_clip_qkv"],
        "softmax_scale": released["softmax_scale"],
        "prefix_lm": released["prefix_lm"],
        "attn_uses_sequence_id": released["attn_uses_sequence_id"],
        "alibi": released["alibi"],
        "alibi_bias_max": released["alibi_bias_max"],
    }
    return MPTConfig(
        d_model=released["d_model"],
        n_heads=released["n_heads"],
        n_layers=released["n_layers"],
        expansion_ratio=released["mlp_ratio"],
        max_seq_len=released["max_seq_len"],
        vocab_size=released["vocab_size"],
        resid_pdrop=released["resid_pdrop"],
        emb_pdrop=released["emb_pdrop"],
        learned_pos_emb=not released["alibi"],
        attn_config=attn,
        logit_scale=released["logit_scale"],
        no_bias=released["no_bias"],
        embedding_fraction=released["embedding_fraction"],
        norm_type="low_precision_layernorm" if released["low_precision_layernorm"] else "layernorm",
        use_cache=False,
    )


def build_reference(released: dict):
    MPTConfig, MPTForCausalLM = import_llmfoundry_mpt()
    torch.manual_seed(SEED)
    model = MPTForCausalLM(reference_config(released, MPTConfig)).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # LayerNorm weights (no biases anywhere)
                param.add_(LN_NOISE * torch.randn(param.shape, generator=gen))
    return model


def released_state_dict(model, released: dict) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if released["model_type"] == "mosaic_gpt":
        renamed = {}
        for key, value in state.items():
            for ours, theirs in MOSAIC_GPT_NAMES:
                key = key.replace(ours, theirs)
            renamed[key] = value
        state = renamed
    return state


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by a full forward per step (no cache: the reference's own cache format predates
    transformers' Cache classes)."""
    sequences, step_logits = prompt, []
    for _ in range(new_tokens):
        logits = model(input_ids=sequences).logits[:, -1]
        step_logits.append(logits)
        sequences = torch.cat([sequences, logits.argmax(-1, keepdim=True)], dim=1)
    return sequences, torch.stack(step_logits, dim=1)


def build_bundle(name: str, out: Path) -> dict:
    from safetensors.torch import save_file

    released = RELEASES[name]["config"]
    model = build_reference(released)
    gen = torch.Generator().manual_seed(SEED + 2)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    attention_mask[1, :PAD] = False
    labels = input_ids.masked_fill(~attention_mask, -100)
    with torch.no_grad():
        out_ = model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out_.logits
        # the loss as transformers computes it: next-token cross-entropy over the labelled positions
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        sequences, step_logits = greedy(model, input_ids[:, :PROMPT], NEW_TOKENS)

    bundle = out / name
    (bundle / "lm").mkdir(parents=True, exist_ok=True)
    parity.write_json(bundle / "lm" / "config.json", released)
    # the released layout: a pickled state dict in pytorch_model.bin, as both releases ship
    torch.save(released_state_dict(model, released), bundle / "lm" / "pytorch_model.bin")
    save_file(
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "logits": logits.contiguous(),
            "loss": loss.reshape(1),
            "prompt": input_ids[:, :PROMPT].contiguous(),
            "sequences": sequences,
            "step_logits": step_logits.contiguous(),
        },
        bundle / "reference.safetensors",
    )
    meta = {
        "release": RELEASES[name]["release"],
        "reference": "llm-foundry 0.1.0 (PyPI) MPTForCausalLM, eval mode, fp32, 1 thread",
        "versions": parity.package_versions() | {"llm-foundry": importlib.metadata.version("llm-foundry")},
        "seed": SEED,
        "layernorm_noise": LN_NOISE,
        "inputs": {
            "batch": BATCH,
            "seq": SEQ,
            "left_padding_row1": PAD,
            "prompt": PROMPT,
            "new_tokens": NEW_TOKENS,
        },
        "generation": "greedy, a full forward per step",
        "files": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bundle.rglob("*"))
            if p.is_file() and p.name != "README.json"
        },
    }
    parity.write_json(bundle / "README.json", meta)
    return meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", choices=sorted(RELEASES), default=sorted(RELEASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.only:
        meta = build_bundle(name, args.out)
        print(json.dumps({"bundle": name, "files": len(meta["files"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
