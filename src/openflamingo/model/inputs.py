"""From prompts and PIL images to the tensors Flamingo.forward / generate take, and the checks those tensors pass
(with errors that say what is wrong, instead of a failure deep inside the LM or images silently ignored)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from ..errors import InputError


def prepare_inputs(
    model, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]], padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Tokenize `prompts` (with `<image>` where each image goes, in the model's own tokens: see
    SpecialTokens.model_text) and preprocess each sample's images.

    Samples with fewer images are padded with zero images and `num_images` records the real counts. Left padding
    suits generation; use "right" for training-style batches.
    """
    if len(prompts) != len(images):
        raise InputError(f"got {len(prompts)} prompts but {len(images)} image lists")
    tokenizer = model.tokenizer
    previous_side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        texts = [model.config.special_tokens.model_text(prompt) for prompt in prompts]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = previous_side
    size = model.vision_encoder.image_size
    max_images = max((len(sample) for sample in images), default=0)
    pixels = torch.zeros(len(prompts), max(max_images, 1), 1, 3, size, size)
    for b, sample in enumerate(images):
        if sample:
            pixels[b, : len(sample), 0] = model.vision_encoder.preprocess(list(sample))
    return {
        "input_ids": encoded.input_ids,
        "attention_mask": encoded.attention_mask,
        "images": pixels if max_images else None,
        "num_images": torch.tensor([len(sample) for sample in images]),
    }


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """`fn` applied to every tensor in nested dicts/lists/tuples (a training micro-step is {dataset: {name:
    tensor}}); other values unchanged."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(fn, v) for v in value)
    return value


def to_device(value: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Every tensor in nested dicts/lists/tuples moved to `device`."""
    return map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking), value)


def check_inputs(model, input_ids, images, attention_mask, num_images, image_features=None) -> None:
    """Clear errors for inputs that would otherwise fail deep inside `model` (a Flamingo) or silently ignore images:
    token ids within its vocabulary, shapes that agree, and as many `<image>` tokens per sample as images."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise InputError(f"input_ids must be an integer tensor (B, L); got {_describe(input_ids)}")
    # One device-to-host transfer for the data-dependent checks below.
    low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist()
    if low < 0 or high >= model.vocab_size:
        raise InputError(f"input_ids must lie in [0, {model.vocab_size}); got [{low}, {high}]")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    media_counts = (input_ids == model.special_ids.media).sum(1).cpu()
    if images is not None and image_features is not None:
        raise InputError("pass images or image_features (precomputed vision-encoder tokens), not both")
    if images is None and image_features is None:
        if int(media_counts.max()) > 0:
            raise InputError("input_ids contain <image> tokens but no images were given")
        return
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.ndim != 6 or not images.is_floating_point():
            raise InputError(f"images must be a float tensor (B, T_img, F, C, H, W); got {_describe(images)}")
        if images.shape[0] != input_ids.shape[0] or images.shape[3] != 3:
            raise InputError(
                f"images shape {tuple(images.shape)} does not fit input_ids {tuple(input_ids.shape)}: "
                "need B equal and C = 3"
            )
    else:
        encoder = (model.vision_encoder.num_tokens, model.vision_encoder.dim)
        _check_image_features(image_features, input_ids, encoder)
    B, T = (images if images is not None else image_features).shape[:2]
    expected = torch.full((B,), T) if num_images is None else torch.as_tensor(num_images).reshape(-1).cpu()
    if expected.shape[0] != B or int(expected.max()) > T or int(expected.min()) < 0:
        raise InputError(
            f"num_images must hold B={B} counts between 0 and T_img={T}; got {expected.tolist()}"
        )
    mismatched = (media_counts != expected).nonzero()
    if len(mismatched):
        b = int(mismatched[0])
        have, want = int(media_counts[b]), int(expected[b])
        if have > want:
            raise InputError(f"sample {b} has {have} <image> tokens but only {want} images")
        if have < want:
            raise InputError(
                f"sample {b} has {have} <image> tokens for {want} images, so images {have + 1}..{want} would be "
                "ignored; pass num_images=[...] when the image tensor is padded"
            )


def _check_image_features(features, input_ids: torch.Tensor, encoder: tuple[int, int]) -> None:
    """`features` as the vision encoder emits them: (B, T_img, F, num_tokens, D_vis) with `encoder` = (num_tokens,
    D_vis)."""
    if not isinstance(features, torch.Tensor) or features.ndim != 5 or not features.is_floating_point():
        raise InputError(
            "image_features must be a float tensor (B, T_img, F, num_tokens, D_vis) of vision-encoder tokens; "
            f"got {_describe(features)}"
        )
    if features.shape[0] != input_ids.shape[0] or tuple(features.shape[3:]) != encoder:
        raise InputError(
            f"image_features shape {tuple(features.shape)} does not fit input_ids {tuple(input_ids.shape)} and "
            f"this model's vision encoder: need B equal and (num_tokens, D_vis) = {encoder}"
        )


def check_logits_at(logits_at: torch.Tensor, input_ids: torch.Tensor) -> None:
    """`logits_at` as Flamingo.forward takes it: a (B, L) bool mask like `input_ids`, or (N,) integer flat indices."""
    if logits_at.dtype == torch.bool:
        if tuple(logits_at.shape) != tuple(input_ids.shape):
            raise InputError(
                f"logits_at shape {tuple(logits_at.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
    elif logits_at.ndim != 1 or logits_at.is_floating_point():
        raise InputError(
            f"logits_at must be a (B, L) bool mask or (N,) flat indices; got {_describe(logits_at)}"
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
