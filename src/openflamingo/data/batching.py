"""Batches from prepared samples: padded (one sample per row) or packed (several documents per row).

A packed row holds whole documents back to back; `document_ids` numbers them 1, 2, ... (0 on padding) so the model
gives each document block-diagonal causal self-attention, positions restarting at 0, and cross-attention to its own
images only. The row's images are its documents' images concatenated in order, so `<image>` tokens and images still
pair up by order within the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from .text import IGNORE_INDEX


@dataclass
class PreparedSample:
    """A formatted, tokenized sample with its preprocessed images; `ref` says where it came from (for resume)."""

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]  # (C, H, W) each, or cached encoder tokens (num_tokens, dim); stacked once
    ref: Any = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_images(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class MediaLayout:
    """What a batch's per-image tensors are and under which key they go: preprocessed pixels (C, H, W) under
    `images`, or the vision encoder's tokens (num_tokens, dim) from a feature cache under `image_features`.
    `shape` and `dtype` make the zero slot of a batch without any image."""

    key: str = "images"
    shape: tuple[int, ...] = (3, 1, 1)
    dtype: torch.dtype = torch.float32


PIXELS = MediaLayout()


@dataclass
class PackingConfig:
    row_tokens: int = 2048  # token budget of one packed row
    max_images_per_row: int = 32  # bounds the image tensor (and memory) of one row
    pool_rows: float = 2.0  # pack from a pool of this many rows' worth of tokens: more pool, fuller rows


def pack_rows(
    lengths: Sequence[int],
    image_counts: Sequence[int],
    num_rows: int,
    row_tokens: int,
    max_images_per_row: int,
) -> list[list[int]]:
    """First-fit decreasing: sample indices for up to `num_rows` rows; samples that fit nowhere stay unplaced.

    Longest first (ties: earliest first), each into the first row with room for its tokens and images. The longest
    waiting sample always goes into the empty first row, so no sample waits in the pool forever.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    image_room: list[int] = []
    for i in order:
        if lengths[i] > row_tokens or image_counts[i] > max_images_per_row:
            raise InputError(
                f"sample of {lengths[i]} tokens and {image_counts[i]} images does not fit a row of {row_tokens} tokens "
                f"and {max_images_per_row} images; set max_tokens <= row_tokens and max_images <= max_images_per_row"
            )
        for r in range(len(rows)):
            if lengths[i] <= room[r] and image_counts[i] <= image_room[r]:
                rows[r].append(i)
                room[r] -= lengths[i]
                image_room[r] -= image_counts[i]
                break
        else:
            if len(rows) < num_rows:
                rows.append([i])
                room.append(row_tokens - lengths[i])
                image_room.append(max_images_per_row - image_counts[i])
    # Within a row, keep arrival order (documents in the order the shuffled stream produced them).
    return [sorted(row) for row in rows]


def _image_tensor(
    per_row: list[list[torch.Tensor]], media: MediaLayout = PIXELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_img, 1, C, H, W) (or (B, T_img, 1, num_tokens, dim) of cached features) from each row's images in
    order, zero-padded to the row with most; and the counts."""
    counts = [len(row) for row in per_row]
    shapes = {tuple(t.shape) for row in per_row for t in row}
    if len(shapes) > 1:
        raise InputError(
            f"preprocessed images have different shapes {sorted(shapes)}; the preprocess must resize"
        )
    first = next((t for row in per_row for t in row), None)
    shape, dtype = (first.shape, first.dtype) if first is not None else (media.shape, media.dtype)
    images = torch.empty(len(per_row), max(max(counts), 1), 1, *shape, dtype=dtype)  # each slot written below
    for b, row in enumerate(per_row):
        for i, image in enumerate(row):
            images[b, i, 0] = image
        images[b, len(row) :].zero_()
    return images, torch.tensor(counts, dtype=torch.long)


def collate_padded(
    samples: Sequence[PreparedSample], pad_id: int, media: MediaLayout = PIXELS
) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest; images zero-padded to the most images in the batch."""
    length = max(len(s) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for b, sample in enumerate(samples):
        input_ids[b, : len(sample)] = torch.tensor(sample.input_ids)
        labels[b, : len(sample)] = torch.tensor(sample.labels)
        attention_mask[b, : len(sample)] = 1
    images, num_images = _image_tensor([s.images for s in samples], media)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        media.key: images,
        "num_images": num_images,
    }


def collate_packed(
    rows: Sequence[Sequence[PreparedSample]], pad_id: int, media: MediaLayout = PIXELS
) -> dict[str, torch.Tensor]:
    """Several documents per row, right-padded to the longest row, with document_ids (0 = padding)."""
    lengths = [sum(len(s) for s in row) for row in rows]
    length = max(lengths)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for document, sample in enumerate(row, start=1):
            end = start + len(sample)
            input_ids[b, start:end] = torch.tensor(sample.input_ids)
            labels[b, start:end] = torch.tensor(sample.labels)
            document_ids[b, start:end] = document
            start = end
    images, num_images = _image_tensor([[image for s in row for image in s.images] for row in rows], media)
    return {
        "input_ids": input_ids,
        "attention_mask": (document_ids > 0).long(),
        "labels": labels,
        media.key: images,
        "num_images": num_images,
        "document_ids": document_ids,
    }


class Batcher:
    """Collects prepared samples into batches: `batch_size` samples (padded) or `batch_size` packed rows."""

    def __init__(
        self,
        batch_size: int,
        pad_id: int,
        packing: PackingConfig | None = None,
        media: MediaLayout = PIXELS,
    ):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.packing = packing
        self.media = media
        self.pending: list[PreparedSample] = []  # arrived, not yet in a batch (part of the loader state)

    def add(self, sample: PreparedSample) -> None:
        self.pending.append(sample)

    def ready(self) -> bool:
        if self.packing is None:
            return len(self.pending) >= self.batch_size
        pool = self.packing.pool_rows * self.batch_size * self.packing.row_tokens
        return sum(len(s) for s in self.pending) >= pool

    def pop_batch(self) -> dict[str, torch.Tensor] | None:
        """The next batch from the pending samples (a smaller one at the end of a finite stream), or None."""
        if not self.pending:
            return None
        if self.packing is None:
            batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
            return collate_padded(batch, self.pad_id, self.media)
        rows = pack_rows(
            [len(s) for s in self.pending],
            [s.num_images for s in self.pending],
            self.batch_size,
            self.packing.row_tokens,
            self.packing.max_images_per_row,
        )
        placed = {i for row in rows for i in row}
        batch_rows = [[self.pending[i] for i in row] for row in rows]
        self.pending = [s for i, s in enumerate(self.pending) if i not in placed]
        return collate_packed(batch_rows, self.pad_id, self.media)


def concat_batches(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """The rows of several batches of one dataset in one batch: tokens right-padded to the longest, images
    zero-padded to the most per row; one batch is returned as it is."""
    if len(batches) == 1:
        return batches[0]
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}  # attention_mask, document_ids, images: 0
    out = {}
    for key in batches[0]:
        parts = [batch[key] for batch in batches]
        if key == "num_images":
            out[key] = torch.cat(parts)
            continue
        size = max(part.shape[1] for part in parts)
        padded = []
        for part in parts:
            missing = size - part.shape[1]
            if missing:
                pad = part.new_full((part.shape[0], missing, *part.shape[2:]), fill.get(key, 0))
                part = torch.cat([part, pad], dim=1)
            padded.append(part)
        out[key] = torch.cat(padded)
    return out
