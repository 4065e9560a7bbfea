"""Gated cross-attention dense block (Flamingo, Alayrac et al. 2022, Sec. 2.2).

`x += tanh(attn_gate) * XAttn(norm(x), media)` then `x += tanh(ff_gate) * FFW(norm(x))`. With the gates at 0 the block
is the identity, so a fresh model computes exactly what the frozen language model computes.

The recipe is data: OpenFlamingo's blocks (LayerNorm, GELU feed-forward of 4x the LM width, scalar gates, a block before
the last layer of every n) and IDEFICS' (RMSNorm, optional per-head q/k RMSNorm, the LM's SwiGLU feed-forward, scalar
or per-channel gates, a block before the first layer of every n) are two settings of `CrossAttentionConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config_loader import check_choices
from ..errors import InputError
from .layers import FeedForwardKind, Norm, make_feed_forward, make_norm
from .packing import equal_runs


@dataclass
class CrossAttentionConfig:
    every_n_layers: int = 1  # one block per group of n decoder layers
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4  # feed-forward width in multiples of the LM's hidden size, unless ff_dim is given
    only_attend_immediate_media: bool = True  # False: each token sees all images at or before it
    gate_init: float = 0.0
    # Zero the attention/FFW output projections so the block is still the identity at init while the projections
    # get gradients from step one (with gates at 0 only the gates do). Pair it with a non-zero gate_init.
    zero_init_output: bool = False
    # Where in each group of every_n_layers the block goes: before its last layer ((i + 1) % n == 0, OpenFlamingo)
    # or its first (i % n == 0, IDEFICS). `layers` lists the decoder-layer indices instead.
    group_position: Literal["last", "first"] = "last"
    layers: list[int] | None = None
    kv_heads: int | None = None  # heads of the visual keys/values (grouped-query attention); None: `heads`
    feed_forward: FeedForwardKind = "gelu"
    ff_dim: int | None = None  # feed-forward hidden width (IDEFICS: the LM's intermediate size)
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False  # a `norm` over each head's queries and keys
    gate: Literal["scalar", "vector"] = "scalar"  # one tanh gate per block, or one per channel
    gate_init_std: float = 0.0  # gates start at gate_init + N(0, gate_init_std^2) (IDEFICS' "normal" init)
    # IDEFICS: after an end-of-sequence token, text sees no image until the next one (documents packed by its data).
    media_ends_at_eos: bool = False

    def __post_init__(self) -> None:
        check_choices(self, "cross_attention")
        if self.every_n_layers < 1:
            raise InputError(f"cross_attention.every_n_layers={self.every_n_layers} must be >= 1")
        if self.layers is not None:
            self.layers = list(self.layers)
            if not self.layers or any(not isinstance(i, int) or i < 0 for i in self.layers):
                raise InputError(f"cross_attention.layers={self.layers} must list decoder-layer indices >= 0")
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            raise InputError(f"cross_attention.kv_heads={self.kv_heads} must divide heads={self.heads}")

    def block_layers(self, num_layers: int) -> list[int]:
        """The decoder layers that get a block before them, for an LM of `num_layers` layers."""
        if self.layers is not None:
            outside = [i for i in self.layers if i >= num_layers]
            if outside:
                raise InputError(
                    f"cross_attention.layers: {outside} out of range for a {num_layers}-layer LM"
                )
            return sorted(set(self.layers))
        n = self.every_n_layers
        if self.group_position == "last":
            return [i for i in range(num_layers) if (i + 1) % n == 0]
        return [i for i in range(num_layers) if i % n == 0]


def media_attention_mask(
    text_time: torch.Tensor,
    media_floor: torch.Tensor | None,
    num_media: int,
    tokens_per_media: int,
    immediate: bool,
) -> torch.Tensor:
    """Which visual tokens each text token may attend to: (B, 1, L, T*n) bool.

    text_time[b, l] is the 1-based index of the most recent image at or before token l (0 = none yet);
    media_floor[b, l] is the number of images that belong to earlier documents packed into the same row (None: 0).
    """
    media_time = torch.arange(1, num_media + 1, device=text_time.device).repeat_interleave(tokens_per_media)
    text_time = text_time[:, None, :, None]
    if immediate:
        return text_time == media_time
    allowed = media_time <= text_time
    if media_floor is not None:
        allowed &= media_time > media_floor[:, None, :, None]
    return allowed


@dataclass(frozen=True)
class ImageSpans:
    """With only_attend_immediate_media each token sees one image: per row, runs (start, end, image) of tokens that
    all see the 1-based image `image` (0: none), so a run attends to that image's visual tokens alone instead of all
    T * tokens_per_image of the row under a mask."""

    rows: list[list[tuple[int, int, int]]]
    tokens_per_image: int


def image_spans(text_time: torch.Tensor, tokens_per_image: int) -> ImageSpans:
    """The runs of equal `text_time` in each row (one wait for the device)."""
    return ImageSpans(equal_runs(text_time), tokens_per_image)


@torch.compiler.disable  # the spans are data: compiled, every new layout would be a new graph
def attend_per_image(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, spans: ImageSpans
) -> torch.Tensor:
    """q (B, H, L, d), keys/values (B, H_kv, T*n, d) -> (B, H, L, d); runs that see no image get zeros."""
    grouped, n = keys.shape[1] != q.shape[1], spans.tokens_per_image
    rows = []
    # Split, not sliced: the backward of a slice fills a zero tensor of the whole input per slice.
    for row, *tensors in zip(spans.rows, q.unbind(0), keys.unbind(0), values.unbind(0), strict=True):
        queries, row_keys, row_values = tensors
        queries = queries.split([end - start for start, end, _ in row], dim=1)
        image_keys, image_values = row_keys.split(n, dim=1), row_values.split(n, dim=1)
        pieces = [
            F.scaled_dot_product_attention(
                query, image_keys[image - 1], image_values[image - 1], enable_gqa=grouped
            )
            if image
            else torch.zeros_like(query)
            for query, (_, _, image) in zip(queries, row, strict=True)
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows)


def blank_after_end_of_sequence(
    is_media: torch.Tensor, is_eos: torch.Tensor, carried: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """IDEFICS' rule: a token that follows an end-of-sequence token, with no image since, sees no image (the EOS
    token itself still does). Returns the (B, L) bool mask of such tokens, and the (B,) state after the last token
    for the next call on the same rows; `carried` is that state from the previous call (None: the first call)."""
    eos_before = F.pad(is_eos.long().cumsum(-1), (1, 0))  # (B, L + 1): EOS tokens before position l
    positions = torch.arange(is_media.shape[1], device=is_media.device)
    last_image = torch.where(is_media, positions, -1).cummax(-1).values
    eos_at_image = torch.where(last_image >= 0, eos_before.gather(1, last_image.clamp(min=0)), 0)
    blank = eos_before[:, :-1] > eos_at_image
    after = eos_before[:, -1] > eos_at_image[:, -1]
    if carried is not None:
        no_image_yet = last_image < 0
        blank |= no_image_yet & carried[:, None]
        after |= no_image_yet[:, -1] & carried
    return blank, after


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, dim_visual: int, cfg: CrossAttentionConfig):
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.kv_heads = cfg.kv_heads or cfg.heads
        self.norm = make_norm(cfg.norm, dim, cfg.norm_eps)
        self.to_q = nn.Linear(dim, self.heads * self.dim_head, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * self.kv_heads * self.dim_head, bias=False)
        self.to_out = nn.Linear(self.heads * self.dim_head, dim, bias=False)
        self.q_norm = make_norm(cfg.norm, self.dim_head, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg.norm, self.dim_head, cfg.norm_eps) if cfg.qk_norm else None

    def media_keys_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """media (B, T, n, D_vis) -> keys, values (B, kv_heads, T*n, dim_head); computed once per image set."""
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)
        k, v = (torch.unflatten(t, -1, (self.kv_heads, self.dim_head)).transpose(1, 2) for t in (k, v))
        if self.k_norm is not None:
            k = self.k_norm(k)
        # Contiguous once here, instead of copied by attention at every decode step that reuses them.
        return k.contiguous(), v.contiguous()

    def forward(self, x, keys, values, media_mask: torch.Tensor | ImageSpans) -> torch.Tensor:
        """media_mask: (B, 1, L, T*n) from media_attention_mask, or ImageSpans."""
        # torch.unflatten, not Tensor.unflatten: compiled decode steps trace the former without a graph break.
        q = torch.unflatten(self.to_q(self.norm(x)), -1, (self.heads, self.dim_head)).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if isinstance(media_mask, ImageSpans):
            out = attend_per_image(q, keys, values, media_mask)
            return self.to_out(out.transpose(1, 2).flatten(-2))
        # Tokens with no image to see get a harmless full row (a fully masked row makes NaNs), then exact zeros.
        has_media = media_mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=media_mask | ~has_media, enable_gqa=self.kv_heads != self.heads
        )
        out = out * has_media
        return self.to_out(out.transpose(1, 2).flatten(-2))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, dim_visual: int, cfg: CrossAttentionConfig):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, cfg)
        self.attn_gate = nn.Parameter(_initial_gate(dim, cfg))
        ff_norm = make_norm(cfg.norm, dim, cfg.norm_eps)
        self.ff = make_feed_forward(cfg.feed_forward, dim, cfg.ff_dim or dim * cfg.ff_mult, ff_norm)
        self.ff_gate = nn.Parameter(_initial_gate(dim, cfg))
        if cfg.zero_init_output:
            nn.init.zeros_(self.attn.to_out.weight)
            nn.init.zeros_(self.ff.output.weight)

    def forward(self, x, keys, values, media_mask: torch.Tensor | ImageSpans) -> torch.Tensor:
        x = x + self.attn_gate.tanh() * self.attn(x, keys, values, media_mask)
        return x + self.ff_gate.tanh() * self.ff(x)


def _initial_gate(dim: int, cfg: CrossAttentionConfig) -> torch.Tensor:
    gate = torch.full((dim if cfg.gate == "vector" else 1,), cfg.gate_init)
    if cfg.gate_init_std > 0:
        gate += torch.randn_like(gate) * cfg.gate_init_std
    return gate
