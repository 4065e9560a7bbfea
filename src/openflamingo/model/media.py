"""What the text sees of the images: the media state of a run of language-model calls over the same rows.

Life cycle. A `MediaState` is made from the visual tokens of one batch of image sets and lives as long as the
sequences it conditions: one `Flamingo.forward`, one `Flamingo.generate`, or a `DecodeState` from `Flamingo.prefill`
through its `decode_step`s. Only `Flamingo` installs it for an LM call (`Flamingo._calling`); each call's pre-hook
then `place`s that call's tokens: it works out which image each token sees (`media_mask`, valid for that call only)
and carries `images_seen` / `eos_since_image` to the next call on the same rows. The visual keys/values of each
gated block are computed on the first call that needs them and reused by every later one.

Rules (OpenFlamingo's, and IDEFICS' with `media_ends_at_eos`): a token sees the most recent <image> at or before it
(or every earlier one with `only_attend_immediate_media=False`); generated tokens never start an image (a generated
<image> included) and, with `media_ends_at_eos`, never end one, so cached and uncached decoding agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import InputError
from .cross_attention import ImageSpans, blank_after_end_of_sequence, image_spans, media_attention_mask
from .packing import restart_per_document

KeysValues = tuple[torch.Tensor, torch.Tensor]


@dataclass
class MediaState:
    visual_tokens: torch.Tensor  # (B, T_img, n, D_vis)
    # Columns from this one on hold generated tokens (None: all are prompt), counted from the first LM call.
    prompt_length: int | None = None
    # Packed rows: 0 on padding, 1, 2, ... per document; each token sees only its own document's images.
    document_ids: torch.Tensor | None = None
    # The caller already checked that no token refers to a missing image (skips a device sync per call).
    validated: bool = False
    # Block key (its decoder layer's index, as in Flamingo.cross_attn_blocks) -> that block's keys/values of the
    # visual tokens, (B, kv_heads, T*n, dim_head).
    keys_values: dict[str, KeysValues] = field(default_factory=dict)
    # (B,) image index (1-based, 0 = none) the last token placed sees, for the next cached call.
    images_seen: torch.Tensor | None = None
    # (B,) whether an end-of-sequence token came after that image (media_ends_at_eos).
    eos_since_image: torch.Tensor | None = None
    # Which visual tokens each token of the current LM call may attend to, set by `place`: a (B, 1, L, T*n) mask,
    # or, when each token sees one image and the call has several tokens and images, that image per run of tokens.
    media_mask: torch.Tensor | ImageSpans | None = None

    def place(
        self,
        input_ids: torch.Tensor,
        num_cached: int | torch.Tensor,
        media_id: int,
        eos_id: int | None,
        immediate: bool,
    ) -> None:
        """Work out what each token of an LM call sees: `input_ids` (B, L) continue `num_cached` earlier columns (an
        int, or a 0-d tensor from a static cache: used without a device sync, so compiled decode steps need no graph
        break). `eos_id` given: an end-of-sequence token ends the current image (IDEFICS)."""
        self.match_batch(input_ids.shape[0])
        # A static cache's count is on the device: a call with one continues the call that placed tokens before.
        continuing = num_cached > 0 if isinstance(num_cached, int) else self.images_seen is not None
        if continuing and self.images_seen is None:
            raise InputError("a cached language-model call must continue an uncached one on the same media")
        is_media = input_ids == media_id
        prompt = None
        if self.prompt_length is not None:
            columns = torch.arange(input_ids.shape[1], device=input_ids.device) + num_cached
            prompt = columns < self.prompt_length
            is_media &= prompt
        text_time = is_media.cumsum(-1) + (self.images_seen[:, None] if continuing else 0)
        media_floor = None
        if self.document_ids is not None:
            text_time, media_floor = restart_per_document(is_media, text_time, self.document_ids)
        num_media, tokens_per_media = self.visual_tokens.shape[1:3]
        # Generated tokens add no image, so decoding steps need no check (and no device sync).
        decoding = (
            isinstance(num_cached, int)
            and self.prompt_length is not None
            and num_cached >= self.prompt_length
        )
        if not (self.validated or decoding) and int(text_time.max()) > num_media:
            raise InputError(f"input has more <image> tokens than images ({num_media} per sample)")
        self.images_seen = text_time[:, -1]
        if eos_id is not None:
            is_eos = input_ids == eos_id
            if prompt is not None:
                is_eos &= prompt
            carried = self.eos_since_image if continuing else None
            blank, self.eos_since_image = blank_after_end_of_sequence(is_media, is_eos, carried)
            text_time = text_time.masked_fill(blank, 0)
        if immediate and num_media > 1 and input_ids.shape[1] > 1:
            self.media_mask = image_spans(text_time, tokens_per_media)
        else:
            self.media_mask = media_attention_mask(
                text_time, media_floor, num_media, tokens_per_media, immediate
            )

    def match_batch(self, batch_size: int) -> None:
        """HF generate expands each prompt to beams / return sequences: expand the visual tokens alike."""
        current = self.visual_tokens.shape[0]
        if batch_size == current:
            return
        if batch_size % current:
            raise InputError(f"language model called with batch {batch_size} for {current} image sets")
        self.select_rows(torch.arange(current, device=self.visual_tokens.device).repeat_interleave(
            batch_size // current
        ))  # fmt: skip

    def snapshot(self) -> MediaState:
        """A copy to replay a call with (activation checkpointing): the replay fills its own keys/values."""
        return dataclasses.replace(self, keys_values=dict(self.keys_values))

    # ----- rows (serving's continuous batching, scoring's candidates) --------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (or repeat) the rows at `index`, in that order."""
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        self.visual_tokens = pick(self.visual_tokens)
        self.keys_values = {i: (pick(k), pick(v)) for i, (k, v) in self.keys_values.items()}
        self.images_seen, self.eos_since_image = pick(self.images_seen), pick(self.eos_since_image)

    def concatenate(self, other: MediaState) -> None:
        """Append `other`'s rows; the image axis is padded with zero images (which no token attends to)."""
        images = max(self.visual_tokens.shape[1], other.visual_tokens.shape[1])
        tokens_per_image = self.visual_tokens.shape[2]
        self.visual_tokens = torch.cat(
            [_pad_after(self.visual_tokens, images, 1), _pad_after(other.visual_tokens, images, 1)]
        )
        if set(self.keys_values) != set(other.keys_values):
            raise InputError("cannot join media states with keys/values of different blocks")
        self.keys_values = {
            i: tuple(
                torch.cat(
                    [_pad_after(a, images * tokens_per_image, 2), _pad_after(b, images * tokens_per_image, 2)]
                )
                for a, b in zip(self.keys_values[i], other.keys_values[i], strict=True)
            )
            for i in self.keys_values
        }
        self.images_seen = _cat_optional(self.images_seen, other.images_seen)
        self.eos_since_image = _cat_optional(self.eos_since_image, other.eos_since_image)


def _pad_after(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Zeros after axis `dim` up to `size` (visual tokens: T images; keys/values: T*n tokens)."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    return F.pad(t, [0, 0] * (t.ndim - 1 - dim) + [0, missing])


def _cat_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if (a is None) != (b is None):
        raise InputError("cannot join a media state that has placed tokens with one that has not")
    return None if a is None else torch.cat([a, b])
