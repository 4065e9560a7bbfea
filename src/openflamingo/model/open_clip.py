"""open_clip ViT vision towers as transformers CLIP vision models, so open_clip itself is never needed.

OpenFlamingo's encoders are open_clip ViTs; their weights map one-to-one onto `CLIPVisionModel` (the fused attention
input projection splits into q/k/v). The patch tokens match open_clip 2.20's tokens before `ln_post`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError, MissingFileError

# open_clip 2.20 CLIPVisionCfg defaults, used where a model config leaves a field out.
OPEN_CLIP_VISION_DEFAULTS = {
    "image_size": 224,
    "layers": 12,
    "width": 768,
    "head_width": 64,
    "patch_size": 16,
}
OPEN_CLIP_VISION_USED = {"image_size", "layers", "width", "head_width", "heads", "patch_size", "mlp_ratio"}
# Accepted whatever their value: patch_dropout only acts in training mode and the encoder is frozen; tokens are
# always taken before ln_post here (OpenFlamingo's convention), which final_ln_after_pool only changes in >= 2.23.
OPEN_CLIP_VISION_IGNORED = {"patch_dropout", "output_tokens", "final_ln_after_pool"}
# Features this converter does not implement, with the value that means "off".
OPEN_CLIP_VISION_UNSUPPORTED = {
    "ls_init_value": None,
    "input_patchnorm": False,
    "global_average_pool": False,
    "attentional_pool": False,
    "timm_model_name": None,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "pool_type": "tok",
    "act_kwargs": None,
    "norm_kwargs": None,
}
# Only meaningful together with an unsupported feature above.
OPEN_CLIP_VISION_INERT = {
    "n_queries",
    "attn_pooler_heads",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
}


def clip_vision_config_from_open_clip(open_clip_model_config: dict):
    """The transformers CLIPVisionConfig equivalent to an open_clip model config's ViT vision tower."""
    from transformers import CLIPVisionConfig

    vision = open_clip_model_config.get("vision_cfg") if isinstance(open_clip_model_config, dict) else None
    if not isinstance(vision, dict):
        raise InputError(
            "open_clip config: expected the open_clip model-config JSON object with a 'vision_cfg' object "
            f"(like open_clip's model_configs/ViT-L-14.json), got keys {sorted(open_clip_model_config or {})}"
        )
    known = (
        OPEN_CLIP_VISION_USED
        | OPEN_CLIP_VISION_IGNORED
        | set(OPEN_CLIP_VISION_UNSUPPORTED)
        | OPEN_CLIP_VISION_INERT
    )
    unknown = sorted(set(vision) - known)
    if unknown:
        raise InputError(f"open_clip config: vision_cfg has unknown key(s) {', '.join(unknown)}")
    unsupported = {
        k: vision[k] for k, off in OPEN_CLIP_VISION_UNSUPPORTED.items() if vision.get(k, off) != off
    }
    if unsupported:
        raise InputError(
            f"open_clip config: vision_cfg {unsupported} is not supported; only plain ViTs convert "
            f"(expected {{{', '.join(f'{k}: {OPEN_CLIP_VISION_UNSUPPORTED[k]!r}' for k in unsupported)}}})"
        )
    settings = {**OPEN_CLIP_VISION_DEFAULTS, **vision}
    if not isinstance(settings["layers"], int):
        raise InputError(
            f"open_clip config: vision_cfg.layers={settings['layers']!r} is a ResNet; only ViTs convert"
        )
    image_size, patch_size = settings["image_size"], settings["patch_size"]
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise InputError(
                f"open_clip config: vision_cfg.image_size={image_size!r}; only square images convert"
            )
        image_size = image_size[0]
    if isinstance(patch_size, (list, tuple)):
        if len(set(patch_size)) != 1:
            raise InputError(
                f"open_clip config: vision_cfg.patch_size={patch_size!r}; only square patches convert"
            )
        patch_size = patch_size[0]
    width = settings["width"]
    heads = settings.get("heads") or width // settings["head_width"]
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * settings.get("mlp_ratio", 4.0)),
        num_hidden_layers=settings["layers"],
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        # open_clip uses QuickGELU only when the model config says so (OpenAI's weights need it).
        hidden_act="quick_gelu" if open_clip_model_config.get("quick_gelu", False) else "gelu",
        layer_norm_eps=1e-5,  # torch.nn.LayerNorm's default, which open_clip uses
        attention_dropout=0.0,
    )


_OPEN_CLIP_RENAMES = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_OPEN_CLIP_BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# nn.MultiheadAttention packs q, k, v along dim 0 in that order.
_OPEN_CLIP_BLOCK_QKV = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_OPEN_CLIP_DROPPED = ("proj",)  # the contrastive projection; Flamingo reads tokens before it


def convert_open_clip_vision_state_dict(
    state: dict[str, Tensor], open_clip_model_config: dict
) -> tuple[dict[str, Tensor], list[str]]:
    """open_clip VisionTransformer keys (no "visual." prefix) -> (ClipVisionEncoder state dict, dropped keys)."""
    num_layers = clip_vision_config_from_open_clip(open_clip_model_config).num_hidden_layers
    renames = {source: f"vision_model.{target}" for source, target in _OPEN_CLIP_RENAMES.items()}
    qkv_sources = {}
    for layer in range(num_layers):
        source_block, target_block = (
            f"transformer.resblocks.{layer}.",
            f"vision_model.encoder.layers.{layer}.",
        )
        for source, target in _OPEN_CLIP_BLOCK_RENAMES.items():
            renames[source_block + source] = target_block + target
        for source, kind in _OPEN_CLIP_BLOCK_QKV.items():
            qkv_sources[source_block + source] = (target_block + "self_attn.", kind)
    unknown = sorted(set(state) - set(renames) - set(qkv_sources) - set(_OPEN_CLIP_DROPPED))
    if unknown:
        raise InputError(
            f"open_clip vision state dict: unknown key(s) {', '.join(unknown)} for a {num_layers}-layer plain ViT "
            "(keys must not carry the 'visual.' prefix)"
        )
    missing = sorted((set(renames) | set(qkv_sources)) - set(state))
    if missing:
        raise InputError(f"open_clip vision state dict: missing key(s) {', '.join(missing)}")
    converted = {target: state[source] for source, target in renames.items()}
    for source, (target_prefix, kind) in qkv_sources.items():
        # clone: views into one packed tensor could not be saved with safetensors
        for name, part in zip(("q_proj", "k_proj", "v_proj"), state[source].chunk(3, dim=0), strict=True):
            converted[f"{target_prefix}{name}.{kind}"] = part.clone()
    dropped = [key for key in _OPEN_CLIP_DROPPED if key in state]
    return converted, dropped


def load_open_clip_visual_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The `visual.*` tensors of an open_clip checkpoint (.safetensors, or .pt/.bin state dict), prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"open_clip checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputError(
                f"open_clip checkpoint {path}: torch.load(weights_only=True) failed ({err}); expected a state-dict "
                "checkpoint (.pt/.bin) or .safetensors, not a TorchScript archive"
            ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip training checkpoints wrap the weights with epoch/optimizer
    if state and all(key.startswith("module.") for key in state):
        state = {
            key[len("module.") :]: value for key, value in state.items()
        }  # saved from a DDP-wrapped model
    visual = {key[len("visual.") :]: value for key, value in state.items() if key.startswith("visual.")}
    if not visual:
        raise InputError(
            f"open_clip checkpoint {path}: no 'visual.*' keys; first keys are {sorted(state)[:5]}"
        )
    return visual
