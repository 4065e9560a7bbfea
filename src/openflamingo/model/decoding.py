"""Where a batch of sequences stands between two cached language-model calls: `DecodeState`.

`Flamingo.prefill` makes one from prompts (left-padded; a long prompt can be fed in chunks), `Flamingo.decode_step`
feeds generated tokens to it. It holds everything the next call needs and nothing the caller has to work out: the
LM's KV cache, the attention mask of every column so far, each row's next position id, and the media state (see
media.py). Serving batches rows of several states together (`concatenate`, `select_rows`), scoring continues one
prompt with many candidates (`fork`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..errors import InputError
from .media import MediaState


@dataclass
class DecodeState:
    cache: Any  # the LM's cache object (a transformers Cache), grown in place by each call
    mask: torch.Tensor  # (B, L) 1 on real tokens, 0 on padding, one column per cached position
    next_positions: torch.Tensor  # (B,) position id of each row's next token
    media: MediaState | None = None  # None: text only

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    def fork(self, rows: int = 1) -> DecodeState:
        """A copy whose every row is repeated `rows` times (candidates continuing one prompt); calls on the copy
        leave this state as it is."""
        index = torch.arange(len(self), device=self.mask.device).repeat_interleave(rows)
        forked = DecodeState(copy.deepcopy(self.cache), self.mask, self.next_positions, copy.copy(self.media))
        forked.select_rows(index)
        return forked

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (or repeat) the rows at `index`, in that order."""
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self.next_positions = self.next_positions.index_select(0, index)
        if self.media is not None:
            self.media.select_rows(index)

    def drop_padding_columns(self) -> None:
        """Drop the leading columns that are padding in every row (rows left after others finished)."""
        start = int(self.columns - self.mask.sum(1).max())
        if start > 0:
            self.cache = DynamicCache(
                [(k[:, :, start:], v[:, :, start:]) for k, v in cache_layers(self.cache)]
            )
            self.mask = self.mask[:, start:]

    def concatenate(self, other: DecodeState) -> None:
        """Append `other`'s rows, left-padding the shorter one's columns (both with media, or both without)."""
        if (self.media is None) != (other.media is None):
            raise InputError("cannot batch rows with images together with text-only rows")
        length = max(self.columns, other.columns)
        self.cache = DynamicCache(
            [
                (torch.cat([_left_pad(k1, length), _left_pad(k2, length)]),
                 torch.cat([_left_pad(v1, length), _left_pad(v2, length)]))
                for (k1, v1), (k2, v2) in zip(cache_layers(self.cache), cache_layers(other.cache), strict=True)
            ]
        )  # fmt: skip
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(other.mask, length)])
        self.next_positions = torch.cat([self.next_positions, other.next_positions])
        if self.media is not None:
            self.media.concatenate(other.media)


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each (B, heads, L, dim), of a full-attention cache (sliding-window layers keep only
    their window, so their columns cannot be lined up with another cache's)."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(layer, "is_sliding", False) for layer in layers):
        raise InputError(
            f"batching cached rows needs a full-attention DynamicCache; this language model returned "
            f"{type(cache).__name__}{' with sliding-window layers' if layers else ''}"
        )
    return [(layer.keys, layer.values) for layer in layers]


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros before the sequence axis (dim 2 of cache tensors, dim 1 of masks) up to `length`."""
    dim = 2 if t.ndim == 4 else 1
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    return F.pad(t, [0, 0] * (t.ndim - 1 - dim) + [missing, 0])
