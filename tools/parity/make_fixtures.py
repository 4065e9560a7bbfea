#!/usr/bin/env python
"""Write OpenFlamingo 2.0.1 numerical-parity fixtures: one small bundle per LM family.

Runs only inside the peer venv made by tools/parity/setup_peer.sh:

    $PEER_VENV/bin/python tools/parity/make_fixtures.py --out tests/fixtures/parity

For every family (llama, opt, gpt_neox, mpt) this builds, offline, a tiny randomly initialised
OpenFlamingo model with the peer's own code -- open_flamingo.create_model_and_transforms fed with a
local Hugging Face LM directory and a registered open_clip config -- then shrinks the perceiver and
the gated cross-attention blocks (again with the peer's own classes) so that a bundle stays at a
few MB. It then records inputs, outputs, intermediate activations, gradients, one optimizer step
and a greedy generation, and checks that the saved state dict alone reproduces the logits in a
freshly built model. See tools/parity/README.md for the bundle layout.

Everything is seeded and paths of temporary files are replaced by placeholders, so two runs give
byte-identical bundles.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

# No model hub is reachable; make any accidental download attempt fail fast instead of hanging.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

_TORCHVISION_STUB = None  # the Library object must stay alive, or its schemas are dropped again


def install_torchvision_stub() -> str:
    """Make `import torchvision` work with CPU torch 2.13.0 and PyPI's torchvision 0.28.0.

    That torchvision wheel is built against CUDA torch, so its compiled operator library cannot be
    loaded here. torchvision survives that, except that torchvision/_meta_registrations.py registers
    fake (meta) kernels for `torchvision::nms` and `torchvision::qnms`, which requires those operators
    to exist. Declaring the two schemas (without kernels) is enough for the import; open_clip only
    needs the pure-Python transforms, and nothing here calls nms.
    """
    global _TORCHVISION_STUB
    if "torchvision" in sys.modules:
        return "not-needed (torchvision already imported)"
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "not-needed (torchvision missing)"
    compiled = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")))
    try:
        for lib in compiled:
            torch.ops.load_library(lib)
        if compiled:
            return "not-needed (compiled ops load)"
    except (OSError, RuntimeError):
        pass
    _TORCHVISION_STUB = torch.library.Library("torchvision", "DEF")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        _TORCHVISION_STUB.define(schema)
    return "schema-stub for torchvision::nms/qnms (compiled ops unloadable with CPU torch)"


TORCHVISION_IMPORT = install_torchvision_stub()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ARCHES = ("llama", "opt", "gpt_neox", "mpt")
SEED = 0
NUM_THREADS = 1  # fixed so reductions (and therefore every stored float) do not depend on the host

# Tiny language model shared by all families.
LM_DIMS = {"hidden": 64, "layers": 4, "heads": 4, "ffn": 128, "max_positions": 128}
# transformers' default init (std 0.02) leaves q.k scores near 0 at this width, i.e. almost uniform
# attention and almost flat logits: a wrong softmax scale or mask would then move outputs by ~1e-4
# only. A larger std makes attention peaked and the logits spread, so such mistakes show clearly.
LM_INIT_STD = 0.1
LLAMA_KV_HEADS = 2  # grouped-query attention, as in current Llama-family checkpoints (SmolLM2 too)
BPE_VOCAB = 384  # byte-level alphabet (256) + 3 specials + 125 merges
CORPUS_LINES = 2000
CORPUS_SEED = 20240611
CROSS_ATTN_EVERY_N_LAYERS = 2

VIT_NAME = "openflamingo-parity-vit-tiny"
VIT_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,  # OpenFlamingo's ViT-L-14 'openai' encoder runs with QuickGELU
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 32,
        "head_width": 16,
        "patch_size": 8,
        "mlp_ratio": 4.0,
    },
    # open_clip always builds a text tower too; OpenFlamingo drops it (keeps `.visual` only).
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}

# Hyper-parameters of the Flamingo parts. STANDARD = what open_flamingo 2.0.1 hard-codes
# (Flamingo.__init__ and FlamingoLMMixin.init_flamingo pass no overrides); TINY = what the committed
# bundles use after replacing those modules.
STANDARD_PERCEIVER = {
    "depth": 6,
    "dim_head": 64,
    "heads": 8,
    "num_latents": 64,
    "max_num_media": None,
    "max_num_frames": None,
    "ff_mult": 4,
}
STANDARD_XATTN = {"dim_head": 64, "heads": 8, "ff_mult": 4, "only_attend_immediate_media": True}
TINY_PERCEIVER = {
    "depth": 2,
    "dim_head": 16,
    "heads": 2,
    "num_latents": 8,
    "max_num_media": None,
    "max_num_frames": None,
    "ff_mult": 4,
}
TINY_XATTN = {"dim_head": 16, "heads": 2, "ff_mult": 4, "only_attend_immediate_media": True}

B_TRAIN, T_IMG_TRAIN = 3, 3
T_IMG_GEN = 2
IMAGE_HW = (36, 52)  # non-square, larger than 32: open_clip's resize + center crop both do work
GENERATE_KWARGS = {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 1, "do_sample": False}
LR, WEIGHT_DECAY, CLIP_NORM = 1e-4, 0.1, 1.0
PERTURB_SCALE = 0.1
DEFAULT_MAX_BUNDLE_BYTES = 3 * 1024 * 1024

TRAIN_TEXTS = [
    # starts with an image; three <image> for three images; the last chunk stays open
    "<image>A brown dog runs on the grass.<|endofchunk|><image>Three boats on a lake.<|endofchunk|>"
    "<image>An old man reads",
    # text before the first <image>: no image to attend (zero cross-attention) and labels masked;
    # text between <|endofchunk|> and the next <image>: labels masked;
    # two <image> tokens for three images: the third image is never attended
    "Caption: <image>A white cat on a chair.<|endofchunk|> filler words <image>A red car.<|endofchunk|>",
    # two <image> back to back; the shortest sample, so it gets right padding
    "<image><image>Two photos of one street.<|endofchunk|>",
]
GEN_PROMPTS = [
    "<image>Output: a yellow bird.<|endofchunk|><image>Output:",
    "<image>Output:",  # one <image> for two images: the second image is never attended
]

PLACEHOLDER_TMP = "<tmp>"


# --------------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------------
def package_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for dist in (
        "torch",
        "torchvision",
        "open-flamingo",
        "open_clip_torch",
        "transformers",
        "tokenizers",
        "huggingface_hub",
        "einops",
        "einops-exts",
        "safetensors",
        "numpy",
        "pillow",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    versions["torchvision_shim"] = TORCHVISION_IMPORT
    return versions


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scrub_paths(value, tmp_root: str):
    """Replace the temporary directory in every string of a JSON-like value by a placeholder."""
    if isinstance(value, str):
        return value.replace(tmp_root, PLACEHOLDER_TMP)
    if isinstance(value, dict):
        return {k: scrub_paths(v, tmp_root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_paths(v, tmp_root) for v in value]
    return value


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# tokenizer and language model, built offline
# --------------------------------------------------------------------------------------------
# The corpus draws on a small word list that covers the fixture texts, so the 125 merges turn most of
# their words into one or two tokens and the fixture sequences stay short.
_ARTICLES = "A An The Two Three One".split()
_ADJECTIVES = "brown white red yellow old small big".split()
_NOUNS = "dog cat man bird boat boats car house street photos book chair lake grass".split()
_VERBS = "runs sleeps reads floats parks sits".split()
_PLACES = ["on the grass", "on a lake", "on a chair", "near a house", "of one street", "in the street"]
_PREFIXES = ["Output:", "Caption:", "filler words"]


def synthetic_corpus(n_lines: int, seed: int):
    """Deterministic caption-like lines ("Caption: A red car parks near a house.") with a few numbers
    and punctuation marks, so byte-level BPE learns merges the fixture texts actually use."""
    rng = random.Random(seed)
    for _ in range(n_lines):
        words = [rng.choice(_PREFIXES)] if rng.random() < 0.4 else []
        words += [rng.choice(_ARTICLES), rng.choice(_ADJECTIVES), rng.choice(_NOUNS)]
        if rng.random() < 0.7:
            words += [rng.choice(_VERBS), rng.choice(_PLACES)]
        if rng.random() < 0.15:
            words.append(str(rng.randint(0, 99)))
        yield " ".join(words) + rng.choice([".", ".", ".", ",", "!", "?"])


def train_tokenizer(out_dir: Path):
    """Byte-level BPE without a pad token (so OpenFlamingo adds <PAD>), saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(synthetic_corpus(CORPUS_LINES, CORPUS_SEED), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=LM_DIMS["max_positions"],
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def lm_config(arch: str, vocab_size: int, bos_id: int, eos_id: int):
    """A transformers config for the tiny LM of one family (all dropouts 0)."""
    import transformers as tf

    d = LM_DIMS
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    init = {"init_std": LM_INIT_STD} if arch == "opt" else {"initializer_range": LM_INIT_STD}
    if arch == "llama":
        return tf.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d["hidden"],
            intermediate_size=d["ffn"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            num_key_value_heads=LLAMA_KV_HEADS,
            max_position_embeddings=d["max_positions"],
            rms_norm_eps=1e-5,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **ids,
            **init,
        )
    if arch == "opt":
        # OPT ties lm_head to embed_tokens by default: this family covers the tied-embedding path.
        # pad_token_id=None: no embedding row is a padding_idx (the tokenizer has no pad token).
        return tf.OPTConfig(
            vocab_size=vocab_size,
            hidden_size=d["hidden"],
            ffn_dim=d["ffn"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            max_position_embeddings=d["max_positions"],
            word_embed_proj_dim=d["hidden"],
            do_layer_norm_before=True,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            pad_token_id=None,
            tie_word_embeddings=True,
            **ids,
            **init,
        )
    if arch == "gpt_neox":
        # Pythia-style: partial rotary (25% of each head) and parallel attention/MLP residual.
        return tf.GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=d["hidden"],
            intermediate_size=d["ffn"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            max_position_embeddings=d["max_positions"],
            rotary_pct=0.25,
            use_parallel_residual=True,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            tie_word_embeddings=False,
            **ids,
            **init,
        )
    if arch == "mpt":
        # transformers' native MPT (not the mosaicml remote code): ALiBi, no biases anywhere
        # (LayerNorms included), use_cache=True so generate runs through the KV cache like the others.
        # Its MptMLP hard-codes 4*d_model and ignores expansion_ratio; 4 keeps the config truthful.
        return tf.MptConfig(
            vocab_size=vocab_size,
            d_model=d["hidden"],
            n_heads=d["heads"],
            n_layers=d["layers"],
            expansion_ratio=4,
            max_seq_len=d["max_positions"],
            no_bias=True,
            resid_pdrop=0.0,
            emb_pdrop=0.0,
            attn_config={"alibi": True, "attn_pdrop": 0},  # int: newer transformers type-checks it
            use_cache=True,
            tie_word_embeddings=False,
            **ids,
            **init,
        )
    raise ValueError(f"unknown LM family {arch!r}; expected one of {ARCHES}")


def write_lm_dir(arch: str, out_dir: Path, tokenizer_dir: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    config = lm_config(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def register_vit(config_dir: Path) -> Path:
    import open_clip

    path = config_dir / f"{VIT_NAME}.json"
    write_json(path, VIT_CONFIG)
    open_clip.add_model_config(str(path))
    return path


# --------------------------------------------------------------------------------------------
# the OpenFlamingo model
# --------------------------------------------------------------------------------------------
def decoder_layers_lookup(lang_encoder) -> dict:
    """How open_flamingo's factory found the decoder-layer list: the first key of its table that is
    a substring of the (lower-cased) LM class name."""
    from open_flamingo.src import factory

    table = getattr(factory, "__KNOWN_DECODER_LAYERS_ATTR_NAMES")
    class_name = type(lang_encoder).__name__
    for key, attr in table.items():
        if key.lower() in class_name.lower():
            return {"class_name": class_name, "matched_key": key, "attr_name": attr}
    return {"class_name": class_name, "matched_key": None, "attr_name": None}


def replace_flamingo_parts(model, perceiver_hp: dict, xattn_hp: dict) -> None:
    """Swap the perceiver and every gated cross-attention block for smaller ones built from the
    peer's own classes, then redo open_flamingo's freezing."""
    from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler

    model.perceiver = PerceiverResampler(dim=model.vis_dim, **perceiver_hp)
    model.perceiver._use_gradient_checkpointing = False
    lang = model.lang_encoder
    for i, block in enumerate(lang.gated_cross_attn_layers):
        if block is not None:
            lang.gated_cross_attn_layers[i] = GatedCrossAttentionBlock(
                dim=model.lang_dim, dim_visual=model.vis_dim, **xattn_hp
            )
    # The peer's own way to propagate changed gated_cross_attn_layers into the FlamingoLayers
    # (it rebuilds them around old_decoder_blocks; wrap_fsdp does the same).
    lang.init_flamingo_layers(gradient_checkpointing=False)
    # Same freezing as open_flamingo.create_model_and_transforms (freeze_lm_embeddings=False).
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    lang.gated_cross_attn_layers.requires_grad_(True)
    lang.get_input_embeddings().requires_grad_(True)


def check_flamingo_wiring(model, perceiver_hp: dict, xattn_hp: dict) -> dict:
    """Fail loudly unless the model is wired the way open_flamingo wires it, with the given
    hyper-parameters, and its state dict holds every alias of every shared tensor."""
    lang = model.lang_encoder
    layers = lang._get_decoder_layers()
    gated = lang.gated_cross_attn_layers
    assert len(layers) == len(gated) == len(lang.old_decoder_blocks) == LM_DIMS["layers"]
    xattn_indices = []
    for i, layer in enumerate(layers):
        assert layer.decoder_layer is lang.old_decoder_blocks[i], f"layer {i}: decoder_layer not shared"
        assert layer.gated_cross_attn_layer is gated[i], f"layer {i}: gated block not shared"
        if gated[i] is not None:
            xattn_indices.append(i)
            attn = gated[i].attn
            inner = xattn_hp["heads"] * xattn_hp["dim_head"]
            assert attn.heads == xattn_hp["heads"] and attn.to_q.weight.shape == (inner, model.lang_dim)
            assert attn.to_kv.weight.shape == (2 * inner, model.vis_dim)
            assert gated[i].ff[1].weight.shape == (xattn_hp["ff_mult"] * model.lang_dim, model.lang_dim)
    expected = [i for i in range(len(layers)) if (i + 1) % CROSS_ATTN_EVERY_N_LAYERS == 0]
    assert xattn_indices == expected, (xattn_indices, expected)

    perceiver = model.perceiver
    inner = perceiver_hp["heads"] * perceiver_hp["dim_head"]
    assert perceiver.latents.shape == (perceiver_hp["num_latents"], model.vis_dim)
    assert len(perceiver.layers) == perceiver_hp["depth"]
    for attn, ff in perceiver.layers:
        assert attn.heads == perceiver_hp["heads"] and attn.to_q.weight.shape == (inner, model.vis_dim)
        assert ff[1].weight.shape == (perceiver_hp["ff_mult"] * model.vis_dim, model.vis_dim)

    sd = model.state_dict()
    ptr = {k: (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) for k, v in sd.items()}
    layers_attr = lang.decoder_layers_attr_name
    for key in sd:
        for short, long in (
            ("gated_cross_attn_layers", "gated_cross_attn_layer"),
            ("old_decoder_blocks", "decoder_layer"),
        ):
            prefix = f"lang_encoder.{short}."
            if key.startswith(prefix):
                index, rest = key[len(prefix) :].split(".", 1)
                twin = f"lang_encoder.{layers_attr}.{index}.{long}.{rest}"
                assert twin in sd and ptr[twin] == ptr[key], f"{key} is not an alias of {twin}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    embed = lang.get_input_embeddings().weight
    expected_trainable = {
        n
        for n, p in model.named_parameters()
        if n.startswith("perceiver.") or ".gated_cross_attn_layer." in n or p is embed
    }
    assert trainable == expected_trainable, sorted(trainable ^ expected_trainable)
    return {"cross_attn_layer_indices": xattn_indices}


def build_model(arch: str, work: Path, seed: int, standard_dims: bool):
    """Tiny LM dir + registered ViT -> open_flamingo.create_model_and_transforms -> (optionally)
    smaller Flamingo parts. Every random draw is seeded from `seed`."""
    from open_flamingo import create_model_and_transforms

    lm_dir = work / f"lm-{arch}-seed{seed}"
    if not lm_dir.exists():
        write_lm_dir(arch, lm_dir, work / "tokenizer", seed=seed + 1)
    torch.manual_seed(seed + 2)  # open_clip init, resize_token_embeddings' new rows, Flamingo parts
    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=VIT_NAME,
        clip_vision_encoder_pretrained=None,
        lang_encoder_path=str(lm_dir),
        tokenizer_path=str(lm_dir),
        cross_attn_every_n_layers=CROSS_ATTN_EVERY_N_LAYERS,
        use_local_files=True,
        decoder_layers_attr_name=None,  # let the peer infer it from the class name
    )
    if standard_dims:
        perceiver_hp, xattn_hp = STANDARD_PERCEIVER, STANDARD_XATTN
    else:
        perceiver_hp, xattn_hp = TINY_PERCEIVER, TINY_XATTN
        torch.manual_seed(seed + 3)
        replace_flamingo_parts(model, perceiver_hp, xattn_hp)
    wiring = check_flamingo_wiring(model, perceiver_hp, xattn_hp)
    return model, image_processor, tokenizer, lm_dir, perceiver_hp, xattn_hp, wiring


def set_gates(model, seed: int) -> dict:
    """open_flamingo starts both tanh gates at 0, which would hide the whole cross-attention path
    from a parity test; give each a seeded value with |value| in [0.5, 1.5) and a random sign."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for i, block in enumerate(model.lang_encoder.gated_cross_attn_layers):
        if block is None:
            continue
        for name in ("attn_gate", "ff_gate"):
            magnitude = 0.5 + torch.rand(1, generator=gen)
            sign = 1.0 if float(torch.rand(1, generator=gen)) < 0.5 else -1.0
            getattr(block, name).data.copy_(sign * magnitude)
            values[f"lang_encoder.gated_cross_attn_layers.{i}.{name}"] = float(getattr(block, name).detach())
    return values


def perturb_constant_params(model, seed: int) -> list[str]:
    """Norm weights start at 1 and biases at 0; with those values a test cannot tell a missing
    affine, a missing bias or a norm applied twice from the right thing. Add seeded noise to every
    parameter tensor whose entries are all equal (each shared tensor once)."""
    gen = torch.Generator().manual_seed(seed)
    names = []
    for name, p in model.named_parameters():
        if p.numel() <= 1 or not p.is_floating_point():
            continue
        flat = p.detach().reshape(-1)
        if not bool(torch.all(flat == flat[0])):
            continue
        noise = PERTURB_SCALE * torch.randn(p.shape, generator=gen)
        base = float(flat[0])
        p.data.add_(noise * (abs(base) if base != 0.0 else 1.0))
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def make_images(n: int, t: int, seed: int) -> np.ndarray:
    """(n, t, H, W, 3) uint8: a colour gradient, a few rectangles and pixel noise per image."""
    rng = np.random.default_rng(seed)
    h, w = IMAGE_HW
    ys, xs = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    out = np.empty((n, t, h, w, 3), dtype=np.uint8)
    for i in range(n):
        for j in range(t):
            start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            angle = rng.uniform(0, np.pi)
            ramp = np.cos(angle) * xs + np.sin(angle) * ys
            img = start + (end - start) * ramp[..., None] / max(ramp.max(), 1e-6)
            for _ in range(3):
                y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
                img[y0 : y0 + rng.integers(4, h // 2), x0 : x0 + rng.integers(4, w // 2)] = rng.uniform(
                    0, 255, 3
                )
            img += rng.normal(0.0, 12.0, img.shape)
            out[i, j] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def preprocess(images: np.ndarray, image_processor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> open_clip-preprocessed float32 (B, T, F=1, 3, S, S)."""
    rows = [torch.stack([image_processor(Image.fromarray(img)) for img in sample]) for sample in images]
    return torch.stack(rows).unsqueeze(2).contiguous()


def mmc4_labels(input_ids: torch.Tensor, tokenizer, media_id: int, eoc_id: int) -> torch.Tensor:
    """Labels as open_flamingo/train/train_utils.py builds them for interleaved (MMC4) batches:
    pad -> -100; everything before the first <image> -> -100; everything after an <|endofchunk|>
    up to the next <image> -> -100; <image> itself -> -100. (The peer also runs
    `labels[labels == tokenizer.eos_token] = -100`, comparing ids with a string: a no-op.)"""
    labels = input_ids.clone()
    labels[labels == tokenizer.pad_token_id] = -100
    for row in labels:
        first_media = (row == media_id).nonzero()
        stop = int(first_media[0]) if len(first_media) else len(row)
        row[:stop] = -100
        for eoc in (row == eoc_id).nonzero().flatten().tolist():
            nxt = (row[eoc + 1 :] == media_id).nonzero()
            row[eoc + 1 : eoc + 1 + (int(nxt[0]) if len(nxt) else len(row))] = -100
    labels[labels == media_id] = -100
    return labels


# --------------------------------------------------------------------------------------------
# running the model
# --------------------------------------------------------------------------------------------
def record_activations(model, store: dict) -> list:
    def keep(name, index=None):
        def hook(_module, _inputs, output):
            value = output[index] if index is not None else output
            if isinstance(value, (tuple, list)):  # decoder layers of some families return tuples
                value = value[0]
            store[name] = value.detach().clone()

        return hook

    handles = [
        model.vision_encoder.register_forward_hook(keep("vision_tokens", 1)),
        model.perceiver.register_forward_hook(keep("perceiver_out")),
    ]
    for i, layer in enumerate(model.lang_encoder._get_decoder_layers()):
        if layer.gated_cross_attn_layer is not None:
            handles.append(
                layer.gated_cross_attn_layer.register_forward_hook(keep(f"layer{i}.after_gated_xattn"))
            )
        handles.append(layer.decoder_layer.register_forward_hook(keep(f"layer{i}.after_decoder_layer")))
    return handles


def forward_eval(model, batch: dict, capture: bool):
    store = {}
    handles = record_activations(model, store) if capture else []
    model.eval()
    try:
        with torch.no_grad():
            out = model(
                vision_x=batch["vision_x"],
                lang_x=batch["lang_x"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
            )
    finally:
        for handle in handles:
            handle.remove()
    return out.logits.detach().clone(), out.loss.detach().clone(), store


def generate(model, gen: dict):
    model.eval()
    with torch.no_grad():
        result = model.generate(
            gen["vision_x"],
            gen["lang_x"],
            gen["attention_mask"],
            return_dict_in_generate=True,
            output_logits=True,
            **GENERATE_KWARGS,
        )
    return result.sequences, torch.stack(result.logits, dim=1)


def train_step(model, batch: dict, media_id: int, eoc_id: int, reference_logits) -> tuple[dict, dict, dict]:
    """One step the way open_flamingo/train/train.py + train_utils.py take it on one process without
    FSDP, AMP or accumulation: AdamW with weight decay only on names containing 'gated_cross_attn',
    backward, keep only the <image>/<|endofchunk|> rows of the input-embedding gradient,
    clip_grad_norm_(1.0), step."""
    params = [
        (n, p)
        for n, p in model.named_parameters()
        if p.requires_grad and not getattr(p, "exclude_from_optimizer", False)
    ]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in params if "gated_cross_attn" in n], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in params if "gated_cross_attn" not in n], "weight_decay": 0.0},
        ],
        lr=LR,
    )
    model.train()
    out = model(
        vision_x=batch["vision_x"],
        lang_x=batch["lang_x"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    )
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
    embed = model.lang_encoder.get_input_embeddings().weight
    keep_rows = torch.zeros_like(embed.grad)
    keep_rows[media_id] = 1
    keep_rows[eoc_id] = 1
    embed.grad = embed.grad * keep_rows
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = {n: p.detach().clone() for n, p in params}
    _, loss_after, _ = forward_eval(model, batch, capture=False)
    info = {
        "optimizer": f"AdamW lr={LR} betas=(0.9,0.999) eps=1e-8; weight_decay={WEIGHT_DECAY} on params whose "
        "name contains 'gated_cross_attn', 0.0 otherwise",
        "embedding_grad_mask": "only rows media_token_id and eoc_token_id keep gradient",
        "clip_grad_norm": CLIP_NORM,
        "grad_norm_before_clip": float(grad_norm),
        "loss_before": float(out.loss.detach()),
        "loss_after_one_step": float(loss_after),
        "train_mode_logits_equal_eval_logits": bool(torch.equal(out.logits.detach(), reference_logits)),
    }
    return grads, after, info


def alias_groups(state_dict: dict) -> dict:
    groups = {}
    for key, t in state_dict.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        groups.setdefault(ident, []).append(key)
    return {keys[0]: keys[1:] for keys in groups.values() if len(keys) > 1}


def param_counts(model) -> dict:
    params = list(model.parameters())  # each shared tensor once
    return {
        "total_params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
    }


def trainable_groups(model) -> dict:
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name.startswith("perceiver."):
                group = "perceiver"
            elif ".gated_cross_attn_layer." in name or ".gated_cross_attn_layers." in name:
                group = "gated_cross_attn_layers"
            else:
                group = name
            groups[group] = groups.get(group, 0) + p.numel()
    return groups


# --------------------------------------------------------------------------------------------
# one bundle
# --------------------------------------------------------------------------------------------
def position_note(arch: str, model) -> str:
    signature = inspect.signature(model.lang_encoder.forward).parameters
    exposed = "position_ids" in signature
    head = (
        f"HF generate {'computes' if exposed else 'does not compute'} position_ids from the attention "
        f"mask (it only does when 'position_ids' is a named forward() parameter; the FlamingoLMMixin "
        f"forward signature is {list(signature)}). "
    )
    per_family = {
        "llama": "LlamaModel then uses positions 0..L-1 over the padded row, so a left-padded prompt's first "
        "real token sits at position <number of pads>; RoPE is relative, so only float rounding "
        "depends on it. In the right-padded training forward positions are 0..L-1 as usual.",
        "gpt_neox": "GPTNeoXModel then uses positions 0..L-1 over the padded row (left-padded prompts start at "
        "<number of pads>); partial RoPE is relative, so only float rounding depends on it.",
        "opt": "OPTDecoder derives positions itself from the attention mask: cumsum(mask)*mask - 1 (+2 "
        "offset into embed_positions), so real tokens count from 0 with left or right padding and "
        "padding tokens use position -1 (row 1 of embed_positions).",
        "mpt": "MPT has no position ids: the ALiBi bias is slope*(key index - (max_seq_len-1)) over the "
        "key axis only, which softmax turns into a relative bias; padded keys are masked.",
    }
    return head + per_family[arch]


def build_bundle(arch: str, out_root: Path, work: Path, standard_dims: bool, max_bytes: int) -> dict:
    tmp_root = str(work)
    model, image_processor, tokenizer, lm_dir, perceiver_hp, xattn_hp, wiring = build_model(
        arch, work, SEED, standard_dims
    )
    gates = set_gates(model, SEED + 4)
    perturbed = perturb_constant_params(model, SEED + 5)
    media_id, eoc_id = model.media_token_id, model.eoc_token_id
    state = model.state_dict()
    aliases = alias_groups(state)
    weights = {k: v.detach().clone().contiguous() for k, v in state.items()}  # aliases become copies
    del state

    images = make_images(B_TRAIN, T_IMG_TRAIN, SEED + 6)
    tokenizer.padding_side = "right"  # open_flamingo's training data pads on the right
    enc = tokenizer(TRAIN_TEXTS, return_tensors="pt", padding="longest")
    batch = {
        "vision_x": preprocess(images, image_processor),
        "lang_x": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }
    batch["labels"] = mmc4_labels(batch["lang_x"], tokenizer, media_id, eoc_id)
    assert batch["lang_x"].shape[1] <= LM_DIMS["max_positions"] - GENERATE_KWARGS["max_new_tokens"]

    logits, loss, activations = forward_eval(model, batch, capture=True)

    gen_images = make_images(len(GEN_PROMPTS), T_IMG_GEN, SEED + 7)
    tokenizer.padding_side = "left"  # open_flamingo's evaluation pads prompts on the left
    genc = tokenizer(GEN_PROMPTS, return_tensors="pt", padding="longest")
    tokenizer.padding_side = "right"
    gen = {
        "vision_x": preprocess(gen_images, image_processor),
        "lang_x": genc["input_ids"],
        "attention_mask": genc["attention_mask"],
    }
    sequences, step_logits = generate(model, gen)

    grads, after, step_info = train_step(model, batch, media_id, eoc_id, logits)

    # ---- self-check: a model built from different seeds, loaded with the saved weights only
    fresh, *_ = build_model(arch, work, SEED + 1000, standard_dims)
    fresh.load_state_dict(weights, strict=True)
    logits2, loss2, activations2 = forward_eval(fresh, batch, capture=True)
    sequences2, step_logits2 = generate(fresh, gen)
    self_check = {
        "reload_into_fresh_model_logits_max_abs_diff": float((logits2 - logits).abs().max()),
        "reload_loss_abs_diff": float((loss2 - loss).abs()),
        "reload_activations_max_abs_diff": max(
            float((activations2[k] - v).abs().max()) for k, v in activations.items()
        ),
        "reload_generate_sequences_equal": bool(torch.equal(sequences2, sequences)),
        "reload_generate_step_logits_max_abs_diff": float((step_logits2 - step_logits).abs().max()),
    }
    assert all(v == 0.0 for k, v in self_check.items() if k.endswith("diff")), self_check
    assert self_check["reload_generate_sequences_equal"], self_check
    # How far a reimplementation's logits may drift before greedy decoding could pick another token
    # (<|endofchunk|> is excluded: min_new_tokens forbids it for all 8 steps).
    candidates = step_logits.clone()
    candidates[..., eoc_id] = float("-inf")
    top2 = candidates.topk(2, dim=-1).values
    self_check["greedy_min_top1_top2_margin"] = float((top2[..., 0] - top2[..., 1]).min())
    del fresh

    # ---- write into a staging directory, then swap it in
    out_dir = out_root / arch
    stage = out_root / f".{arch}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    save_file(weights, str(stage / "state_dict.safetensors"))
    save_file({**batch, "images_uint8": torch.from_numpy(images)}, str(stage / "inputs.safetensors"))
    save_file({"logits": logits, "loss": loss.reshape(1), **activations}, str(stage / "outputs.safetensors"))
    save_file(grads, str(stage / "grads.safetensors"))
    save_file(
        {
            **gen,
            "images_uint8": torch.from_numpy(gen_images),
            "sequences": sequences,
            "step_logits": step_logits,
        },
        str(stage / "generate.safetensors"),
    )
    tokenizer.save_pretrained(str(stage / "tokenizer"))
    model.lang_encoder.config.save_pretrained(str(stage / "lm_config"))
    write_json(stage / "open_clip_config.json", VIT_CONFIG)

    # after_step is the largest optional file: keep it only while the bundle stays under budget
    # (the margin covers config.json and README.json, written below).
    used = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    after_path = stage / "after_step.safetensors"
    save_file(after, str(after_path))
    if used + after_path.stat().st_size + 200_000 > max_bytes:
        after_path.unlink()
        step_info["after_step_file"] = f"omitted: bundle would exceed {max_bytes} bytes"
    else:
        step_info["after_step_file"] = "after_step.safetensors: trainable params after the step"

    lookup = decoder_layers_lookup(model.lang_encoder)
    lm_cfg = model.lang_encoder.config
    activation_shapes = {k: list(v.shape) for k, v in activations.items()}
    config = {
        "what": "open_flamingo 2.0.1 tiny random-init parity bundle"
        + (" (standard Flamingo dims)" if standard_dims else ""),
        "versions": package_versions(),
        "torch_num_threads": torch.get_num_threads(),
        "build": {
            "arch": arch,
            "size": "tiny-standard-flamingo" if standard_dims else "tiny",
            "seed": SEED,
            "lm_dir": str(lm_dir),
            "lm_class": lookup["class_name"],
            "decoder_layers_attr_name": model.lang_encoder.decoder_layers_attr_name,
            "decoder_layers_attr_name_source": (
                "inferred by open_flamingo's factory: key "
                f"{lookup['matched_key']!r} of its table is a substring of {lookup['class_name']!r}"
            ),
            "cross_attn_every_n_layers": CROSS_ATTN_EVERY_N_LAYERS,
            "vit": {
                "model_name": VIT_NAME,
                "config": VIT_CONFIG,
                "path": str(work / "open_clip" / f"{VIT_NAME}.json"),
                "vision_tokens_before_ln_post": True,
                # repr() of a function includes its address; drop it so reruns stay identical
                "preprocess": re.sub(r" at 0x[0-9a-f]+", "", repr(image_processor)),
            },
            "vis_dim": model.vis_dim,
            "lang_dim": model.lang_dim,
            "media_token_id": media_id,
            "eoc_token_id": eoc_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tokenizer_len": len(tokenizer),
            "tie_word_embeddings": bool(lm_cfg.tie_word_embeddings),
            "attn_implementation": lm_cfg._attn_implementation,
            "flamingo_parts": (
                "as built by create_model_and_transforms"
                if standard_dims
                else "perceiver and gated blocks replaced after create_model_and_transforms by "
                "open_flamingo.src.helpers.PerceiverResampler / GatedCrossAttentionBlock "
                "with flamingo_fixed_hparams, then open_flamingo's freezing redone"
            ),
        },
        "lm_config": lm_cfg.to_dict(),
        "flamingo_fixed_hparams": {
            "perceiver": {"dim": model.vis_dim, **perceiver_hp},
            "gated_cross_attn": {"dim": model.lang_dim, "dim_visual": model.vis_dim, **xattn_hp},
            "cross_attn_layer_indices": wiring["cross_attn_layer_indices"],
            "vision_encoder_output": "vision_encoder(x)[1] = patch tokens (CLS dropped), taken before ln_post",
        },
        "gates_set_to": gates,
        "perturbed_constant_params": {
            "rule": f"ones -> 1 + {PERTURB_SCALE}*N(0,1); zeros -> {PERTURB_SCALE}*N(0,1) (seeded); "
            "applied to every parameter tensor (numel > 1) whose entries were all equal",
            "names": perturbed,
        },
        "texts": TRAIN_TEXTS,
        "gen_prompts": GEN_PROMPTS,
        "generate_kwargs": {
            **GENERATE_KWARGS,
            "output_logits": True,
            "return_dict_in_generate": True,
            "eos_token_id": "default (= eoc_token_id, set by Flamingo.generate)",
            "weights": "state_dict.safetensors (generate ran before the train step)",
        },
        "train_step": step_info,
        "trainable_param_names": [n for n, p in model.named_parameters() if p.requires_grad],
        "param_counts": param_counts(model),
        "trainable_groups": trainable_groups(model),
        "aliases": aliases,
        "shapes": {
            "vision_x": list(batch["vision_x"].shape),
            "lang_x": list(batch["lang_x"].shape),
            "logits": list(logits.shape),
            **activation_shapes,
        },
        "activation_layouts": {
            "vision_tokens": "(B*T_img*F, v, vis_dim) in (b, T, F) row-major order: vision_encoder(x)[1], "
            "patch tokens without CLS, before ln_post",
            "perceiver_out": f"(B, T_img, num_latents={perceiver_hp['num_latents']}, vis_dim)",
            "layer{i}.after_gated_xattn": "(B, L, lang_dim): output of the gated cross-attn block in front of "
            "decoder layer i (only layers in cross_attn_layer_indices)",
            "layer{i}.after_decoder_layer": "(B, L, lang_dim): hidden states after original decoder layer i",
        },
        "notes": [
            "Forward outputs, activations and generate() come from eval() mode with the weights in "
            "state_dict.safetensors; all dropouts are 0, so the train() forward used for grads gives the "
            "same logits (train_step.train_mode_logits_equal_eval_logits).",
            "state_dict keys are exactly model.state_dict() of the open_flamingo model. Modules registered "
            "under two names (old_decoder_blocks.N == <decoder layers>.N.decoder_layer, "
            "gated_cross_attn_layers.N == <decoder layers>.N.gated_cross_attn_layer, tied lm_head) appear "
            "once per name as separate copies; 'aliases' maps the first key to the other keys that share "
            "its storage.",
            "labels follow the MMC4 masking of open_flamingo/train/train_utils.py (pad, text before the "
            "first <image>, text after each <|endofchunk|> up to the next <image>, and <image> are -100).",
            "loss is the HF causal-LM loss: shifted cross-entropy, ignore_index=-100, mean over kept tokens.",
            "grads.safetensors holds raw gradients (before the embedding-row mask and clipping), keyed by "
            "model.named_parameters() names."
            + (
                " Input and output embeddings are tied here, so the embedding gradient includes the "
                "lm_head contribution."
                if lm_cfg.tie_word_embeddings
                else ""
            ),
            "Between the eval forward and the train step, generate() ran on the same weights; the train "
            "step is the last thing done to the model.",
            "Prompts for generate() are left-padded. " + position_note(arch, model),
            f"Generated with torch.set_num_threads({NUM_THREADS}) and "
            "torch.use_deterministic_algorithms(True).",
        ],
        "self_check": self_check,
    }
    write_json(stage / "config.json", scrub_paths(config, tmp_root))

    for path in stage.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt") and tmp_root in path.read_text():
            raise RuntimeError(f"{path} mentions the temporary directory {tmp_root}")

    files = sorted(p for p in stage.rglob("*") if p.is_file())
    readme = {
        "files": {
            p.relative_to(stage).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in files
        },
        "tensors": {
            p.name: {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in load_file(str(p)).items()}
            for p in files
            if p.suffix == ".safetensors"
        },
    }
    write_json(stage / "README.json", readme)

    for path in stage.rglob("*"):  # safetensors writes 0600 files; make the bundle world-readable
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(out_dir, ignore_errors=True)
    stage.rename(out_dir)
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return {
        "arch": arch,
        "dir": str(out_dir),
        "bytes": total,
        "loss": float(loss),
        "lang_x_shape": list(batch["lang_x"].shape),
        "self_check": self_check,
        "after_step": step_info["after_step_file"],
        "generated": sequences[:, gen["lang_x"].shape[1] :].tolist(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="root directory; one sub-directory per family is replaced")
    parser.add_argument("--arch", nargs="+", choices=ARCHES, default=list(ARCHES))
    parser.add_argument(
        "--standard-flamingo-dims",
        action="store_true",
        help="keep open_flamingo's own perceiver (depth 6, 64 latents, 8x64 heads) and gated "
        "blocks (8x64 heads) instead of the tiny replacements; bundles get much larger, "
        "do not commit them",
    )
    parser.add_argument(
        "--max-bundle-bytes",
        type=int,
        default=None,
        help=f"size budget per bundle that decides whether after_step.safetensors is kept "
        f"(default {DEFAULT_MAX_BUNDLE_BYTES}; unlimited with --standard-flamingo-dims)",
    )
    parser.add_argument("--versions", action="store_true", help="import the peer stack, print versions, exit")
    args = parser.parse_args(argv)

    import open_clip  # noqa: F401  (imported here so --versions proves the whole stack imports)
    import open_flamingo  # noqa: F401
    import transformers

    if args.versions:
        print(json.dumps(package_versions()))
        return 0
    if args.out is None:
        parser.error("--out is required")
    max_bytes = args.max_bundle_bytes
    if max_bytes is None:
        max_bytes = 1 << 62 if args.standard_flamingo_dims else DEFAULT_MAX_BUNDLE_BYTES

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="openflamingo-parity-"))
    try:
        (work / "open_clip").mkdir()
        register_vit(work / "open_clip")
        train_tokenizer(work / "tokenizer")
        for arch in args.arch:
            print(
                json.dumps(build_bundle(arch, args.out, work, args.standard_flamingo_dims, max_bytes)),
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
