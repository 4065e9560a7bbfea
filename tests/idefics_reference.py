"""Reference side for IDEFICS conversion tests: tiny random HF `IdeficsForVisionText2Text` models written to a
local directory laid out like the Hub repos HuggingFaceM4/idefics-9b, idefics-80b and their -instruct variants.

Everything is built offline and behaves the same under transformers 4.57 and 5.x. The Hub checkpoints use the
module names of `IdeficsForVisionText2Text` as state-dict keys, and both versions save exactly those:

    model.embed_tokens.weight                        (vocab_size, hidden): the LLaMA vocabulary
    model.embed_tokens.additional_embedding.weight   (2, hidden): <fake_token_around_image>, <image>
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight, model.norm.weight
    model.gated_cross_attn_layers.{j}.{alpha_cross_attn,alpha_dense}: (1,) or (1, 1, hidden) per `alpha_type`
    model.gated_cross_attn_layers.{j}.cross_attn.{q,k,v,o}_proj.weight [.cross_attn.{q,k}_layer_norm.*]
    model.gated_cross_attn_layers.{j}.{mlp.*,input_layernorm.weight,post_attention_layernorm.weight}
    model.vision_model.embeddings.{class_embedding,patch_embedding.weight,position_embedding.weight}
    model.vision_model.{pre_layrnorm,encoder.layers.{k},post_layernorm}.*
    model.perceiver_resampler.{latents,blocks.{d}.{0,1}.*,layer_norm.*}
    lm_head.weight, lm_head.additional_fc.weight

Layer j of `gated_cross_attn_layers` runs before decoder layer j * cross_layer_interval. No tensor is tied
(`tie_word_embeddings` is false), and the rotary `inv_freq` buffers are not persistent, so they are not saved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tiny import make_tokenizer
from transformers import IdeficsConfig, IdeficsForVisionText2Text, PreTrainedTokenizerFast
from transformers.models.idefics.configuration_idefics import IdeficsVisionConfig
from transformers.models.idefics.processing_idefics import (
    image_attention_mask_for_packed_input_ids,
    incremental_to_binary_attention_mask,
)

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
# OpenAI CLIP normalisation, which idefics-9b/-80b's preprocessor_config.json uses.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The vision tower of idefics-9b and -80b, named by the flat (pre-release) config layout.
VISION_MODEL_NAME = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# Std of the noise `build_idefics` adds to every parameter: far above float error, yet activations stay tame.
NOISE = 0.05
# Std of the cross-attention gates `alpha_cross_attn` / `alpha_dense` (tanh(0.5) ~ 0.46).
GATE_STD = 0.5
# Flat (pre-release) config key -> its key in `vision_config`, and the `perceiver_config` keys kept as they are
# at the top level; see `save_hub_layout`.
FLAT_VISION_KEYS = {
    "vision_embed_dim": "embed_dim",
    "vision_image_size": "image_size",
    "vision_intermediate_size": "intermediate_size",
    "vision_patch_size": "patch_size",
    "vision_num_attention_heads": "num_attention_heads",
    "vision_num_hidden_layers": "num_hidden_layers",
}
FLAT_PERCEIVER_KEYS = (
    "resampler_n_latents",
    "resampler_depth",
    "resampler_n_heads",
    "resampler_head_dim",
    "qk_layer_norms_perceiver",
)


def make_idefics_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """tiny.py's BPE plus IDEFICS' two added special tokens as the last ids (the real tokenizer has them at 32000
    and 32001 after LLaMA's 32000 tokens) and `<unk>` as pad, saved into `directory`."""
    tokenizer = make_tokenizer(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": [FAKE_TOKEN, IMAGE_TOKEN]})
    tokenizer.pad_token = "<unk>"
    ids = tokenizer.convert_tokens_to_ids([FAKE_TOKEN, IMAGE_TOKEN])
    assert ids == [len(tokenizer) - 2, len(tokenizer) - 1], ids
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def idefics_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    alpha_type: str = "float",
    qk_layer_norms: bool = False,
    qk_layer_norms_perceiver: bool = False,
    cross_layer_interval: int = 1,
    num_hidden_layers: int = 4,
    **overrides: Any,
) -> IdeficsConfig:
    """A tiny IDEFICS config whose LM is a LLaMA (silu, RMSNorm eps 1e-6, rope theta 10000, the defaults of both
    transformers versions) with 5 vision tokens (4 patches + CLS) per image resampled to 8 latents.

    The gates' init is the Hub's (zeros), which `build_idefics` then randomises: HF cannot build float gates
    with alpha_initializer="normal" (it calls `torch.normal(size=(1))` with an int size, in 4.57 and 5.x alike),
    and a config.json saying so would not load. `overrides` sets further top-level `IdeficsConfig` fields
    (e.g. `use_resampler=False`).
    """
    vision = dict(
        embed_dim=48,
        image_size=28,
        patch_size=14,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    perceiver = dict(
        use_resampler=True,
        resampler_n_latents=8,
        resampler_depth=2,
        resampler_n_heads=2,
        resampler_head_dim=16,
        qk_layer_norms_perceiver=qk_layer_norms_perceiver,
    )
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer) - 2,
        additional_vocab_size=2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        alpha_initializer="zeros",
        alphas_initializer_range=0.0,
        alpha_type=alpha_type,
        cross_layer_interval=cross_layer_interval,
        qk_layer_norms=qk_layer_norms,
        use_resampler=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        vision_config=vision,
        perceiver_config=perceiver,
    )
    kwargs.update(overrides)
    return IdeficsConfig(**kwargs)


def build_idefics(config: IdeficsConfig, seed: int) -> IdeficsForVisionText2Text:
    """A seeded fp32 eval-mode model in which every parameter has seeded N(0, NOISE) added to its init, so that
    norm weights are not ones, biases not zeros and no two tensors of one shape are alike: a converter that maps
    a tensor to the wrong place changes the logits. The gates (zero-initialised) get N(0, GATE_STD) instead, so
    that tanh(gate) is far from 0 and the images change the logits. The global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = IdeficsForVisionText2Text(config)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                std = GATE_STD if name.rsplit(".", 1)[-1].startswith("alpha_") else NOISE
                parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    return model.float().eval()


def _hub_config(model: IdeficsForVisionText2Text, layout: str) -> dict[str, Any]:
    """config.json as the Hub repos have it (written by transformers 4.3x), the same from 4.57 and 5.x but for
    `transformers_version`."""
    data = json.loads(model.config.to_json_string(use_diff=True))
    data.pop("dtype", None)
    data.update(architectures=[type(model).__name__], torch_dtype=str(model.dtype).removeprefix("torch."))
    # transformers 5 adds these two fields; the Hub files (written by 4.3x) have neither, and the values below
    # are what both versions assume when they are missing.
    if data.get("rope_parameters") == {"rope_theta": 10000.0, "rope_type": "default"}:
        del data["rope_parameters"]
    if data.get("max_position_embeddings") == 2048:
        del data["max_position_embeddings"]
    if layout == "flat":
        vision = data.pop("vision_config")
        perceiver = data.pop("perceiver_config")
        unwritten = {key: value for key, value in vision.items() if key not in FLAT_VISION_KEYS.values()}
        defaults = IdeficsVisionConfig().to_dict()
        if any(defaults[key] != value for key, value in unwritten.items()):
            raise ValueError(f"the flat layout has no keys for non-default vision settings {unwritten}")
        data.update({flat: vision[key] for flat, key in FLAT_VISION_KEYS.items()})
        data["vision_model_name"] = VISION_MODEL_NAME
        data["vision_model_params"] = "{}"
        data.update({key: perceiver[key] for key in FLAT_PERCEIVER_KEYS})
        data["use_resampler"] = perceiver["use_resampler"]
    elif layout != "nested":
        raise ValueError(f"layout must be 'nested' or 'flat', not {layout!r}")
    return dict(sorted(data.items()))


def _write_shards(state: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    """`shards` safetensors files of about equal size plus model.safetensors.index.json, as on the Hub (written
    here rather than by `save_pretrained`, whose `max_shard_size` cannot ask for a number of shards)."""
    names = list(state)
    sizes = [state[name].numel() * state[name].element_size() for name in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    seen = 0
    for name, size in zip(names, sizes, strict=True):
        groups[min(shards - 1, seen * shards // total)].append(name)
        seen += size
    if any(not group for group in groups):
        raise ValueError(f"{len(names)} tensors cannot fill {shards} shards")
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file({name: state[name] for name in group}, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, filename))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_hub_layout(
    model: IdeficsForVisionText2Text,
    tokenizer: PreTrainedTokenizerFast,
    directory: Path,
    *,
    layout: str = "nested",
    shards: int = 2,
    pickle: bool = False,
) -> Path:
    """Write `model` and `tokenizer` to `directory` as a Hub IDEFICS repo: config.json, generation_config.json,
    the weights, the tokenizer files and preprocessor_config.json for `IdeficsImageProcessor`.

    layout="nested" is today's config.json (vision and perceiver settings in `vision_config` and
    `perceiver_config`). layout="flat" is the pre-release layout the IDEFICS port started from (transformers PRs
    #25056/#25092/#25149 moved it to the nested one and asked for the Hub configs to be updated): the settings are
    top-level keys `vision_embed_dim`, `vision_image_size`, `vision_intermediate_size`, `vision_patch_size`,
    `vision_num_attention_heads`, `vision_num_hidden_layers`, `vision_model_name`, `vision_model_params` and
    `use_resampler`, `resampler_n_latents`, `resampler_depth`, `resampler_n_heads`, `resampler_head_dim`,
    `qk_layer_norms_perceiver`. That layout had no keys for the vision tower's act/eps; ours are the defaults
    (gelu, 1e-5). Neither transformers version reads the flat keys, so only a converter can load that layout.

    Weights are `shards` safetensors shards with an index, or with pickle=True a single pytorch_model.bin
    (`torch.save` of the state dict), for testing that a converter refuses pickles.
    The state-dict keys are the Hub names listed in this module's docstring in both transformers versions.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = _hub_config(model, layout)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.generation_config.save_pretrained(str(directory))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if pickle:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        _write_shards(state, directory, shards)
    tokenizer.save_pretrained(str(directory))
    vision = model.config.vision_config
    preprocessor = {
        "image_mean": CLIP_MEAN,
        "image_num_channels": vision.num_channels,
        "image_processor_type": "IdeficsImageProcessor",
        "image_size": vision.image_size,
        "image_std": CLIP_STD,
        "processor_class": "IdeficsProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return directory


class _ConfigTokens:
    """The two tokenizer attributes the IDEFICS processor's mask functions read, taken from a model config:
    `<image>` is the last id of the (base + additional) vocabulary, as `make_idefics_tokenizer` arranges."""

    def __init__(self, config: IdeficsConfig) -> None:
        self.eos_token_id = config.eos_token_id
        self._image_token_id = config.vocab_size + config.additional_vocab_size - 1

    def convert_tokens_to_ids(self, token: str) -> int:
        if token != IMAGE_TOKEN:
            raise KeyError(token)
        return self._image_token_id


def image_attention_mask(
    input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerFast | _ConfigTokens, num_images: int
) -> torch.LongTensor:
    """(B, L, num_images) 0/1 mask of which image each token cross-attends to, computed by IdeficsProcessor's own
    functions (importable in both versions): the most recent `<image>`; nothing before the first image, nor after
    an EOS until the next `<image>` (the EOS itself still sees the image before it)."""
    incremental, _ = image_attention_mask_for_packed_input_ids(input_ids, tokenizer, "pt")
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=num_images)


def _model_inputs(
    model: IdeficsForVisionText2Text,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    mask = image_attention_mask(input_ids, _ConfigTokens(model.config), pixel_values.shape[1])
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_attention_mask=mask,
    )


@torch.no_grad()
def reference_logits(
    model: IdeficsForVisionText2Text,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L, vocab_size + 2) logits of one forward pass; pixel_values are (B, num_images, 3, H, W)."""
    inputs = _model_inputs(model, input_ids, pixel_values, attention_mask)
    return model(**inputs, use_cache=False).logits


@torch.no_grad()
def reference_generate(
    model: IdeficsForVisionText2Text,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
) -> torch.LongTensor:
    """(B, <= max_new_tokens) greedy tokens after the prompt from HF `generate` (KV cache unless use_cache=False).
    As in HF, a row stops at EOS and is then filled with the pad id; new tokens see the prompt's last image."""
    inputs = _model_inputs(model, input_ids, pixel_values, attention_mask)
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=use_cache
    )
    return out[:, input_ids.shape[1] :]


def make_prompt(
    tokenizer: PreTrainedTokenizerFast, texts_and_images: Sequence[Sequence[object]]
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-padded (input_ids, attention_mask) for a batch of samples, each a sequence of texts (str) and images
    (any other item), built like IdeficsProcessor: BOS, then texts stripped of spaces and concatenated, each image
    as `<fake><image><fake>` with consecutive images sharing the fake token between them; the whole string is
    tokenized without special tokens, so the tokenizer's added tokens (also a literal "</s>") are single ids."""
    rows = []
    for sample in texts_and_images:
        text = tokenizer.bos_token
        last_was_image = False
        for item in sample:
            if isinstance(item, str):
                text += item.strip(" ")
                last_was_image = False
            else:
                text += IMAGE_TOKEN + FAKE_TOKEN if last_was_image else FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN
                last_was_image = True
        rows.append(tokenizer(text, add_special_tokens=False).input_ids)
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, -len(row) :] = torch.tensor(row)
        attention_mask[index, -len(row) :] = 1
    return input_ids, attention_mask
