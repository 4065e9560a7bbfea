"""IDEFICS builders: a tiny random IDEFICS in the Hub's layout, two prompts with images, their pixels (the
reference model itself: idefics_reference.py)."""

from __future__ import annotations

import torch
from idefics_reference import (
    build_idefics,
    idefics_config,
    make_idefics_tokenizer,
    make_prompt,
    save_hub_layout,
)


def hub_directory(root, seed: int = 0, layout: str = "nested", pickle: bool = False, **options):
    tokenizer = make_idefics_tokenizer(root / "tokenizer-src")
    reference = build_idefics(idefics_config(tokenizer, **options), seed=seed)
    return (
        reference,
        tokenizer,
        save_hub_layout(reference, tokenizer, root / "idefics", layout=layout, pickle=pickle),
    )


def prompts(tokenizer):
    """Two samples with two images each: text before the first image, and an EOS between images (after which, in
    IDEFICS, text sees no image until the next one)."""
    image = object()
    return make_prompt(
        tokenizer,
        [
            ["a photo of", image, "a cat on a mat. and", image, "a dog"],
            [image, "two birds", tokenizer.eos_token, "then", image, "what is this? it is"],
        ],
    )


def pixels(batch: int, images: int, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, images, 3, size, size, generator=torch.Generator().manual_seed(7))
