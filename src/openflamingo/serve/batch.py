"""The rows being decoded together, as left-padded tensors: KV cache, attention mask, positions, image keys/values.

Requests join after their own prefill and leave as soon as they finish, so the batch is rebuilt on membership
changes only: joining left-pads the shorter KV cache to the longer one's length (and the image axis to the larger
image count; padding images are never attended), leaving selects rows and drops the columns that every remaining
row has as padding. Each decode step then appends one column in place (the LM's own cache update).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

KV = tuple[torch.Tensor, torch.Tensor]


def cache_layers(cache: Any) -> list[KV]:
    """Per-layer (keys, values), each (B, heads, L, dim), of an HF cache returned by the LM."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(layer, "is_sliding", False) for layer in layers):
        raise ValueError(
            f"serving needs a full-attention DynamicCache; this language model returned {type(cache).__name__}"
        )
    return [(layer.keys, layer.values) for layer in layers]


@dataclass
class Batch:
    rows: list[Any] = field(default_factory=list)  # what each row is (the engine's Row), in batch order
    cache: Any = None  # DynamicCache over (B, heads, L, dim) tensors per layer
    mask: torch.Tensor | None = None  # (B, L) 1 on real tokens, 0 on left padding
    positions: torch.Tensor | None = None  # (B,) position id of each row's next token
    next_tokens: torch.Tensor | None = None  # (B,) the token each row feeds next
    visual: torch.Tensor | None = (
        None  # (B, T, n, D_vis) visual tokens (only their shape is read when decoding)
    )
    media_kv: dict[int, KV] = field(
        default_factory=dict
    )  # block index -> (B, heads, T*n, dim), computed once
    images_seen: torch.Tensor | None = None  # (B,) index of the image generated tokens attend to (0: none)

    def __len__(self) -> int:
        return len(self.rows)

    def repeat(self, answers: list[int]) -> Batch:
        """Prefilled prompts (one row each) as rows for their answers: row b repeated answers[b] times (a request's
        `n` answers share one prefill)."""
        if all(a == 1 for a in answers):
            return self
        counts = torch.tensor(answers, device=self.mask.device)

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(counts, dim=0)

        return Batch(
            rows=self.rows,
            cache=DynamicCache([(rep(k), rep(v)) for k, v in cache_layers(self.cache)]),
            mask=rep(self.mask),
            positions=rep(self.positions),
            next_tokens=rep(self.next_tokens),
            visual=rep(self.visual),
            media_kv={i: (rep(k), rep(v)) for i, (k, v) in self.media_kv.items()},
            images_seen=rep(self.images_seen),
        )

    def join(self, other: Batch) -> None:
        """Append `other`'s rows (both batches of the same kind: with images or without)."""
        if not self.rows:
            self.__dict__.update(other.__dict__)
            return
        length = max(self.mask.shape[1], other.mask.shape[1])
        ours, theirs = cache_layers(self.cache), cache_layers(other.cache)
        self.cache = DynamicCache(
            [
                (
                    torch.cat([_left_pad(k1, length), _left_pad(k2, length)]),
                    torch.cat([_left_pad(v1, length), _left_pad(v2, length)]),
                )
                for (k1, v1), (k2, v2) in zip(ours, theirs, strict=True)
            ]
        )
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(other.mask, length)])
        self.positions = torch.cat([self.positions, other.positions])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        if self.visual is not None:
            images = max(self.visual.shape[1], other.visual.shape[1])
            tokens_per_image = self.visual.shape[2]
            self.visual = torch.cat(
                [_pad_images(self.visual, images, 1), _pad_images(other.visual, images, 1)]
            )
            self.media_kv = {
                i: tuple(
                    torch.cat(
                        [
                            _pad_images(a, images * tokens_per_image, 2),
                            _pad_images(b, images * tokens_per_image, 2),
                        ]
                    )
                    for a, b in zip(self.media_kv[i], other.media_kv[i], strict=True)
                )
                for i in self.media_kv
            }
            self.images_seen = torch.cat([self.images_seen, other.images_seen])
        self.rows = self.rows + other.rows

    def keep(self, indices: list[int]) -> None:
        """Only the rows at `indices` stay; columns that are padding in all of them are dropped."""
        if not indices:
            self.__dict__.update(Batch().__dict__)
            return
        index = torch.tensor(indices, device=self.mask.device)
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        mask = pick(self.mask)
        # Left padding only: the first column any kept row uses is where the kept cache starts.
        start = int(mask.shape[1] - mask.sum(1).max())
        self.cache = DynamicCache(
            [(pick(k)[:, :, start:], pick(v)[:, :, start:]) for k, v in cache_layers(self.cache)]
        )
        self.mask = mask[:, start:]
        self.positions, self.next_tokens = pick(self.positions), pick(self.next_tokens)
        if self.visual is not None:
            self.visual = pick(self.visual)
            self.media_kv = {i: (pick(k), pick(v)) for i, (k, v) in self.media_kv.items()}
            self.images_seen = pick(self.images_seen)
        self.rows = [self.rows[i] for i in indices]


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros before the sequence axis (dim 2 of cache tensors, dim 1 of masks) up to `length`."""
    dim = 2 if t.ndim == 4 else 1
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def _pad_images(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Zeros after the image axis `dim` up to `size` (visual tokens: T images; keys/values: T*n tokens)."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim) + [0, missing]
    return F.pad(t, pad)
