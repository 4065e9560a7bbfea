"""Write tests/fixtures/released_e2e/: reduced random stand-ins of OpenFlamingo's released 3B, 4B and 9B models, in
the formats a user downloads, and what OpenFlamingo 2.0.1 itself computes with them (see README.md here).

    /tmp/mpt-ref-venv/bin/python tools/released_e2e/make_fixtures.py --out tests/fixtures/released_e2e

Runs only in the reference venv of tools/mpt_parity/setup_reference.sh (the OpenFlamingo 2.0.1 peer venv plus
llm-foundry 0.1.0 for MosaicML's MPT code). The openflamingo library never imports this code.

Per family: the language model directory in its released layout (config.json as published with reduced sizes, the
weights in the released dtype and file layout, the tokenizer files), `checkpoint.pt` as OpenFlamingo's training
saves it (its own `filter_state_dict_to_trainable`), and the logits and greedy generation of the model OpenFlamingo
builds from those files (`create_model_and_transforms` + `load_state_dict(checkpoint, strict=False)`, as its README
tells users). One open_clip ViT (`vit/`) serves all three families.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "parity"))
import make_fixtures as parity  # noqa: E402  (installs the torchvision stub before transformers is imported)

# isort: split

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def _load_mpt_parity():
    spec = importlib.util.spec_from_file_location("mpt_parity", ROOT / "mpt_parity" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mpt_parity = _load_mpt_parity()

SEED = 0
TOKENIZER_VOCAB = 300  # byte-level BPE: 256 bytes + 2 specials + merges
LM_VOCAB = 320  # the LM's embedding rows: more than the tokenizer has, like the releases' 50432 vs 50277
LN_NOISE = 0.2  # norms start at 1 / biases at 0; noise makes a swapped or dropped one visible
INIT_STD = 0.1  # GPT-NeoX stand-in matrices (transformers' 0.02 gives near-uniform attention at this width)
MAX_NEW_TOKENS = 6

VIT_NAME = "openflamingo-released-e2e-vit"
# open_clip's ViT-L-14 (patch 14, QuickGELU for the OpenAI weights) with 2 layers of width 32 at 42 px
VIT_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {
        "image_size": 42,
        "layers": 2,
        "width": 32,
        "head_width": 16,
        "patch_size": 14,
        "mlp_ratio": 4.0,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
# OpenFlamingo's perceiver and blocks (8 heads, ff_mult 4) with smaller depth, latents and head width
PERCEIVER = {
    "depth": 2,
    "dim_head": 4,
    "heads": 8,
    "num_latents": 8,
    "max_num_media": None,
    "max_num_frames": None,
    "ff_mult": 4,
}
XATTN = {"dim_head": 4, "heads": 8, "ff_mult": 4, "only_attend_immediate_media": True}

IMAGE_HW = (48, 60)  # larger than 42 and not square: open_clip's resize and centre crop both act
FORWARD_TEXTS = [  # training-style interleaved documents, right-padded
    "<image>A brown dog runs on the grass.<|endofchunk|><image>Three boats on a lake.<|endofchunk|>",
    "Caption: <image>A white cat.<|endofchunk|><image>A red car<|endofchunk|>",
]
GEN_PROMPTS = [  # evaluation-style few-shot prompts, left-padded
    "<image>Output: a yellow bird.<|endofchunk|><image>Output:",
    "<image>A photo.<image>Output:",
]

_MPT_1B = mpt_parity.RELEASES["mosaic_gpt_1b"]["config"]
_MPT_7B = mpt_parity.RELEASES["mpt_7b"]["config"]
FAMILIES = {
    "openflamingo_3b": {
        "release": "OpenFlamingo-3B-vitl-mpt1b (and -langinstruct)",
        "language_model": "anas-awadalla/mpt-1b-redpajama-200b: MosaicGPT remote code, fp32, one pytorch_model.bin",
        # OpenFlamingo's factory patches get_input_embeddings in when the path contains this name
        "lm_dir_name": "mpt-1b-redpajama-200b",
        "every": 1,
        "kind": "mosaic_gpt",
        "dtype": torch.float32,
        "shards": 1,
        # released: d_model 2048, 24 layers, 50432 rows
        "config": {**_MPT_1B, "d_model": 32, "n_layers": 2, "vocab_size": LM_VOCAB},
    },
    "openflamingo_4b": {
        "release": "OpenFlamingo-4B-vitl-rpj3b (and -langinstruct)",
        "language_model": "togethercomputer/RedPajama-INCITE-Base-3B-v1: GPT-NeoX (transformers), fp16, "
        "one pytorch_model.bin saved by transformers 4.28 (with the attention mask / rotary buffers)",
        "lm_dir_name": "RedPajama-INCITE-Base-3B-v1",
        "every": 2,
        "kind": "gpt_neox",
        "dtype": torch.float16,
        "shards": 1,
        "config": {
            "_name_or_path": "togethercomputer/RedPajama-INCITE-Base-3B-v1",
            "architectures": ["GPTNeoXForCausalLM"],
            "bos_token_id": 0,
            "eos_token_id": 0,
            "hidden_act": "gelu",
            "hidden_size": 64,  # released: 2560
            "initializer_range": 0.02,
            "intermediate_size": 256,  # released: 10240
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 64,  # released: 2048 (its attention-mask buffers are that size squared)
            "model_type": "gpt_neox",
            "num_attention_heads": 32,
            "num_hidden_layers": 2,  # released: 32
            "rotary_emb_base": 10000,
            "rotary_pct": 1.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float16",
            "transformers_version": "4.28.1",
            "use_cache": True,
            "use_parallel_residual": False,
            "vocab_size": LM_VOCAB,  # released: 50432
        },
    },
    "openflamingo_9b": {
        "release": "OpenFlamingo-9B-vitl-mpt7b",
        "language_model": "anas-awadalla/mpt-7b: MPT remote code, bf16, two pytorch_model-0000k-of-00002.bin shards",
        "lm_dir_name": "mpt-7b",
        "every": 4,
        "kind": "mpt",
        "dtype": torch.bfloat16,
        "shards": 2,
        # released: d_model 4096, 32 layers, 50432 rows
        "config": {**_MPT_7B, "d_model": 64, "n_layers": 4, "vocab_size": LM_VOCAB},
    },
}
TOKENIZER_CONFIG = {  # EleutherAI/gpt-neox-20b's, which all three releases ship
    "add_prefix_space": False,
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "model_max_length": 2048,
    "tokenizer_class": "GPTNeoXTokenizer",
}


# --------------------------------------------------------------------------------------------------------------
# the released files
# --------------------------------------------------------------------------------------------------------------
def write_tokenizer(out: Path) -> None:
    """A byte-level BPE shaped like gpt-neox-20b's: <|endoftext|> (id 0) as bos/eos/unk, <|padding|> (id 1), no pad
    token (OpenFlamingo adds <PAD>), no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(parity.synthetic_corpus(parity.CORPUS_LINES, parity.CORPUS_SEED), trainer=trainer)
    assert bpe.get_vocab_size() == TOKENIZER_VOCAB, bpe.get_vocab_size()
    out.mkdir(parents=True, exist_ok=True)
    bpe.save(str(out / "tokenizer.json"))
    parity.write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    parity.write_json(
        out / "special_tokens_map.json",
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    )


def gpt_neox_buffers(config: dict) -> dict[str, torch.Tensor]:
    """The non-parameter tensors transformers 4.28 saved in every GPT-NeoX layer (RedPajama's pytorch_model.bin has
    them): the causal mask, the masked-score constant and the rotary inverse frequencies."""
    n = config["max_position_embeddings"]
    head = config["hidden_size"] // config["num_attention_heads"]
    rotary = int(head * config["rotary_pct"])
    inv_freq = 1.0 / (config["rotary_emb_base"] ** (torch.arange(0, rotary, 2).float() / rotary))
    out = {}
    for i in range(config["num_hidden_layers"]):
        prefix = f"gpt_neox.layers.{i}.attention."
        out[prefix + "bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        out[prefix + "masked_bias"] = torch.tensor(-1e9)
        out[prefix + "rotary_emb.inv_freq"] = inv_freq.clone()
    return out


def language_model_state(family: dict) -> dict[str, torch.Tensor]:
    """Seeded random weights under the release's names, in the release's dtype."""
    config = family["config"]
    if family["kind"] in ("mosaic_gpt", "mpt"):
        model = mpt_parity.build_reference(config)  # llm-foundry's init + seeded LayerNorm noise
        state = mpt_parity.released_state_dict(model, config)
    else:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
        torch.manual_seed(SEED)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**fields))
        gen = torch.Generator().manual_seed(SEED + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("layer_norm.weight"):
                    param.copy_(1 + LN_NOISE * torch.randn(param.shape, generator=gen))
                elif param.ndim == 1:  # biases
                    param.copy_(LN_NOISE * torch.randn(param.shape, generator=gen))
                else:
                    param.copy_(INIT_STD * torch.randn(param.shape, generator=gen))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state |= gpt_neox_buffers(config)
    return {k: v.to(family["dtype"]) if v.is_floating_point() else v for k, v in state.items()}


def write_language_model(family: dict, out: Path, tokenizer_dir: Path) -> None:
    out.mkdir(parents=True)
    parity.write_json(out / "config.json", family["config"])
    state = language_model_state(family)
    if family["shards"] == 1:
        torch.save(state, out / "pytorch_model.bin")
    else:  # split by key order, with the index transformers writes
        keys = list(state)
        per = -(-len(keys) // family["shards"])
        weight_map = {}
        for s in range(family["shards"]):
            name = f"pytorch_model-{s + 1:05d}-of-{family['shards']:05d}.bin"
            part = {k: state[k] for k in keys[s * per : (s + 1) * per]}
            torch.save(part, out / name)
            weight_map |= dict.fromkeys(part, name)
        total = sum(v.numel() * v.element_size() for v in state.values())
        parity.write_json(
            out / "pytorch_model.bin.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    for path in sorted(tokenizer_dir.iterdir()):
        shutil.copyfile(path, out / path.name)


def write_vit(out: Path, work: Path) -> dict[str, torch.Tensor]:
    """A seeded open_clip model of VIT_CONFIG, saved as open_clip's own state dict (open_clip_pytorch_model.bin)
    with its config beside it; norm weights and zero biases get seeded noise."""
    import open_clip

    path = work / f"{VIT_NAME}.json"
    parity.write_json(path, VIT_CONFIG)
    open_clip.add_model_config(str(path))
    torch.manual_seed(SEED + 10)
    model = open_clip.create_model(VIT_NAME, pretrained=None)
    gen = torch.Generator().manual_seed(SEED + 11)
    with torch.no_grad():
        for _, param in model.named_parameters():
            flat = param.reshape(-1)
            if param.numel() > 1 and bool(torch.all(flat == flat[0])):
                base = float(flat[0])
                param.add_(LN_NOISE * torch.randn(param.shape, generator=gen) * (abs(base) if base else 1.0))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True)
    torch.save(state, out / "open_clip_pytorch_model.bin")
    parity.write_json(out / "open_clip_config.json", VIT_CONFIG)
    return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}


# --------------------------------------------------------------------------------------------------------------
# OpenFlamingo 2.0.1 with the remote code
# --------------------------------------------------------------------------------------------------------------
class RemoteCodeAutoModel:
    """Stands in for transformers.AutoModelForCausalLM inside open_flamingo's factory.

    A directory whose config.json has `auto_map` is remote code: transformers would import the directory's Python
    files. Those files are not in the fixtures; MosaicML's own MPT code from PyPI (llm-foundry 0.1.0, the code the
    MPT-7B release shipped and the same computation as MosaicGPT's, see tools/mpt_parity/README.md) is built from
    the config and loads every weight strictly, upcast to fp32 as from_pretrained does without a dtype. Any other
    directory goes to transformers' own AutoModelForCausalLM."""

    calls: list[dict] = []

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import AutoModelForCausalLM

        raw = json.loads((Path(path) / "config.json").read_text())
        cls.calls.append({"auto_map": "auto_map" in raw, **kwargs})
        if "auto_map" not in raw:
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        assert kwargs.get("trust_remote_code") is True
        from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model

        MPTConfig, MPTForCausalLM = mpt_parity.import_llmfoundry_mpt()
        # what the auto class does to every remote-code model class (MosaicML's predate GenerationMixin's split)
        model_class = add_generation_mixin_to_remote_model(MPTForCausalLM)
        torch.manual_seed(SEED + 20)
        model = model_class(mpt_parity.reference_config(raw, MPTConfig))
        state = {}
        for file in sorted(Path(path).glob("pytorch_model*.bin")):
            state |= torch.load(file, map_location="cpu", weights_only=True)
        if raw["model_type"] == "mosaic_gpt":  # MosaicGPT's names -> llm-foundry's
            renamed = {}
            for key, value in state.items():
                for ours, theirs in mpt_parity.MOSAIC_GPT_NAMES:
                    key = key.replace(theirs, ours)
                renamed[key] = value
            state = renamed
        model.load_state_dict(state, strict=True)
        return model


def install_remote_code_loader() -> None:
    from open_flamingo.src import factory

    factory.AutoModelForCausalLM = RemoteCodeAutoModel


def open_flamingo_model(family: dict, lm_dir: Path, visual: dict, seed: int):
    """create_model_and_transforms on the LM directory, the reduced perceiver and blocks, the ViT weights."""
    from open_flamingo import create_model_and_transforms

    torch.manual_seed(seed)
    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=VIT_NAME,
        clip_vision_encoder_pretrained=None,
        lang_encoder_path=str(lm_dir),
        tokenizer_path=str(lm_dir),
        cross_attn_every_n_layers=family["every"],
        use_local_files=True,
    )
    torch.manual_seed(seed + 1)
    parity.replace_flamingo_parts(model, PERCEIVER, XATTN)
    model.vision_encoder.load_state_dict(visual, strict=True)  # the "pretrained" tower
    return model, image_processor, tokenizer


def randomize_flamingo_parts(model, seed: int) -> None:
    """Gates at seeded non-zero values (OpenFlamingo starts them at 0) and seeded noise on the perceiver's and the
    blocks' constant tensors (norm weights and zero biases)."""
    parity.set_gates(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not (name.startswith("perceiver.") or ".gated_cross_attn_layer." in name):
                continue
            flat = param.reshape(-1)
            if param.numel() > 1 and bool(torch.all(flat == flat[0])):
                base = float(flat[0])
                param.add_(LN_NOISE * torch.randn(param.shape, generator=gen) * (abs(base) if base else 1.0))


def released_checkpoint(model) -> dict[str, torch.Tensor]:
    """What OpenFlamingo's training writes as model_state_dict: its own filter_state_dict_to_trainable."""
    if "wandb" not in sys.modules:  # imported by train_utils for logging only
        sys.modules["wandb"] = types.ModuleType("wandb")
    from open_flamingo.train.train_utils import filter_state_dict_to_trainable

    state = filter_state_dict_to_trainable(model, model.state_dict())
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def greedy_full_forward(model, vision_x, lang_x, attention_mask, steps: int):
    """Greedy decoding by one full Flamingo forward per step (no KV cache)."""
    sequences, mask, logits = lang_x, attention_mask, []
    for _ in range(steps):
        step = model(vision_x=vision_x, lang_x=sequences, attention_mask=mask).logits[:, -1]
        logits.append(step)
        sequences = torch.cat([sequences, step.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return sequences, torch.stack(logits, dim=1)


def preprocess(images: np.ndarray, image_processor) -> torch.Tensor:
    return parity.preprocess(images, image_processor)


def build_family(name: str, out_root: Path, work: Path, tokenizer_dir: Path, visual: dict, images) -> dict:
    family = FAMILIES[name]
    stage = out_root / f".{name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    # under the release's own directory name (the 3B's factory hack looks for it), outside the bundle
    lm_dir = work / name / family["lm_dir_name"]
    write_language_model(family, lm_dir, tokenizer_dir)

    # 1. the model OpenFlamingo trained: its factory, then the reduced Flamingo parts, then "training"
    RemoteCodeAutoModel.calls.clear()
    model, _, _ = open_flamingo_model(family, lm_dir, visual, seed=SEED + 30)
    randomize_flamingo_parts(model, seed=SEED + 40)
    checkpoint = released_checkpoint(model)
    torch.save(checkpoint, stage / "checkpoint.pt")
    del model

    # 2. what a user of the release runs: a fresh model from the same files + load_state_dict(strict=False)
    model, image_processor, tokenizer = open_flamingo_model(family, lm_dir, visual, seed=SEED + 50)
    result = model.load_state_dict(torch.load(stage / "checkpoint.pt", weights_only=True), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(checkpoint), sorted(trainable - set(checkpoint))
    model.eval()

    tokenizer.padding_side = "right"  # OpenFlamingo's training batches
    forward = tokenizer(FORWARD_TEXTS, return_tensors="pt", padding="longest")
    tokenizer.padding_side = "left"  # OpenFlamingo's evaluation prompts
    prompts = tokenizer(GEN_PROMPTS, return_tensors="pt", padding="longest")
    vision_x = preprocess(images, image_processor)
    with torch.no_grad():
        logits = model(
            vision_x=vision_x, lang_x=forward["input_ids"], attention_mask=forward["attention_mask"]
        ).logits
        try:
            generated = model.generate(
                vision_x,
                prompts["input_ids"],
                prompts["attention_mask"],
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                num_beams=1,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
            sequences, step_logits = generated.sequences, torch.stack(generated.logits, dim=1)
            generate_how = "Flamingo.generate (transformers generate with the KV cache), greedy"
            generate_error = None
        except Exception as error:  # noqa: BLE001 - recorded in README.json
            model.lang_encoder.clear_conditioned_layers()
            model.lang_encoder._use_cached_vision_x = False
            generate_error = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            generate_how = (
                "greedy by one full Flamingo.forward per step (Flamingo.generate failed, see error)"
            )
            sequences = step_logits = None
        full_sequences, full_step_logits = greedy_full_forward(
            model, vision_x, prompts["input_ids"], prompts["attention_mask"], MAX_NEW_TOKENS
        )
    if sequences is None:
        sequences, step_logits = full_sequences, full_step_logits
    agreement = {
        "generate_equals_full_forward_greedy": bool(torch.equal(sequences, full_sequences)),
        "max_abs_step_logit_diff_generate_vs_full_forward": float(
            (step_logits - full_step_logits).abs().max()
        ),
    }
    candidates = step_logits.clone()
    candidates[..., model.eoc_token_id] = float("-inf")  # min_new_tokens forbids it
    top2 = candidates.topk(2, dim=-1).values

    save_file(
        {
            "images_uint8": torch.from_numpy(images),
            "forward_input_ids": forward["input_ids"],
            "forward_attention_mask": forward["attention_mask"],
            "logits": logits.contiguous(),
            "prompt_input_ids": prompts["input_ids"],
            "prompt_attention_mask": prompts["attention_mask"],
            "sequences": sequences.contiguous(),
            "step_logits": step_logits.contiguous(),
        },
        stage / "reference.safetensors",
    )
    shutil.copytree(lm_dir, stage / "lm")
    layers = model.lang_encoder._get_decoder_layers()
    meta = {
        "release": family["release"],
        "language_model": family["language_model"],
        "reference": "open-flamingo 2.0.1 create_model_and_transforms + load_state_dict(checkpoint.pt, strict=False); "
        + (
            "remote code = llm-foundry 0.1.0 MPTForCausalLM (RemoteCodeAutoModel), fp32"
            if family["kind"] != "gpt_neox"
            else "transformers' GPTNeoXForCausalLM.from_pretrained, fp32"
        ),
        "lm_class": type(model.lang_encoder).__name__,
        "lm_loader_calls": RemoteCodeAutoModel.calls,
        "decoder_layers_attr_name": model.lang_encoder.decoder_layers_attr_name,
        "cross_attn_every_n_layers": family["every"],
        "cross_attn_layer_indices": [
            i for i, layer in enumerate(layers) if layer.gated_cross_attn_layer is not None
        ],
        "perceiver": PERCEIVER,
        "gated_cross_attn": XATTN,
        "vit": {"name": VIT_NAME, "config": VIT_CONFIG, "weights": "../vit/open_clip_pytorch_model.bin"},
        "tokenizer": {
            "len": len(tokenizer),
            "eoc_token_id": model.eoc_token_id,
            "media_token_id": model.media_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "checkpoint_keys": sorted(checkpoint),
        "forward_texts": FORWARD_TEXTS,
        "gen_prompts": GEN_PROMPTS,
        "generate": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "min_new_tokens": MAX_NEW_TOKENS,
            "how": generate_how,
            "error": generate_error,
            **agreement,
            "greedy_min_top1_top2_margin": float((top2[..., 0] - top2[..., 1]).min()),
        },
        "new_tokens": sequences[:, prompts["input_ids"].shape[1] :].tolist(),
        "versions": parity.package_versions() | {"llm-foundry": importlib.metadata.version("llm-foundry")},
        "seed": SEED,
        "torch_num_threads": torch.get_num_threads(),
    }
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    meta["files"] = {
        p.relative_to(stage).as_posix(): {"bytes": p.stat().st_size, "sha256": parity.file_sha256(p)}
        for p in files
    }
    parity.write_json(stage / "README.json", parity.scrub_paths(meta, str(work)))
    out_dir = out_root / name
    shutil.rmtree(out_dir, ignore_errors=True)
    stage.rename(out_dir)
    return {
        "family": name,
        "bytes": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
        "generate": meta["generate"],
        "new_tokens": meta["new_tokens"],
        "lm_class": meta["lm_class"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    install_remote_code_loader()
    with tempfile.TemporaryDirectory(prefix="released-e2e-") as tmp:
        work = Path(tmp)
        write_tokenizer(work / "tokenizer")
        shutil.rmtree(args.out / "vit", ignore_errors=True)
        args.out.mkdir(parents=True, exist_ok=True)
        visual = write_vit(args.out / "vit", work)
        parity.IMAGE_HW = IMAGE_HW  # make_images reads the module's size
        images = parity.make_images(2, 2, SEED + 60)
        for name in args.only:
            print(
                json.dumps(build_family(name, args.out, work, work / "tokenizer", visual, images)), flush=True
            )
    for path in args.out.rglob("*"):  # world-readable, as the other fixtures
        path.chmod(0o755 if path.is_dir() else 0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main())
