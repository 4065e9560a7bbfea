"""From prompts and PIL images to the tensors Flamingo.forward / generate take."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image


def prepare_inputs(
    model, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]], padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Tokenize `prompts` (with `<image>` where each image goes) and preprocess each sample's images.

    Samples with fewer images are padded with zero images and `num_images` records the real counts. Left padding
    suits generation; use "right" for training-style batches.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    tokenizer = model.tokenizer
    previous_side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
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
