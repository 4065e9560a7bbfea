"""Gated cross-attention dense block (Flamingo, Alayrac et al. 2022, Sec. 2.2).

`x += tanh(attn_gate) * XAttn(LN(x), media)` then `x += tanh(ff_gate) * FFW(x)`. With the gates at 0 the block is the
identity, so a fresh model computes exactly what the frozen language model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .perceiver import FeedForward


@dataclass
class CrossAttentionConfig:
    every_n_layers: int = 1  # a block before LM decoder layer i when (i + 1) % every_n_layers == 0
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    only_attend_immediate_media: bool = True  # False: each token sees all images at or before it
    gate_init: float = 0.0
    # Zero the attention/FFW output projections so the block is still the identity at init while the projections
    # get gradients from step one (with gates at 0 only the gates do). Pair it with a non-zero gate_init.
    zero_init_output: bool = False


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


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def media_keys_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """media (B, T, n, D_vis) -> keys, values (B, heads, T*n, dim_head); computed once per image set."""
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)
        return tuple(t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (k, v))

    def forward(self, x, keys, values, media_mask: torch.Tensor) -> torch.Tensor:
        """media_mask (B, 1, L, T*n) from media_attention_mask."""
        q = self.to_q(self.norm(x)).unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
        # Tokens with no image to see get a harmless full row (a fully masked row makes NaNs), then exact zeros.
        has_media = media_mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=media_mask | ~has_media)
        out = out * has_media
        return self.to_out(out.transpose(1, 2).flatten(-2))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, dim_visual: int, cfg: CrossAttentionConfig):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, cfg.heads, cfg.dim_head)
        self.attn_gate = nn.Parameter(torch.tensor([cfg.gate_init]))
        self.ff = FeedForward(dim, cfg.ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([cfg.gate_init]))
        if cfg.zero_init_output:
            nn.init.zeros_(self.attn.to_out.weight)
            nn.init.zeros_(self.ff.fc2.weight)

    def forward(self, x, keys, values, media_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_gate.tanh() * self.attn(x, keys, values, media_mask)
        return x + self.ff_gate.tanh() * self.ff(x)
