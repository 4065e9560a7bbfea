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


def media_attention_mask(text_time: torch.Tensor, num_media: int, tokens_per_media: int, immediate: bool):
    """Which visual tokens each text token may attend to: (B, 1, L, T*n) bool.

    text_time[b, l] is the 1-based index of the most recent image at or before token l (0 = no image yet).
    """
    media_time = torch.arange(1, num_media + 1, device=text_time.device).repeat_interleave(tokens_per_media)
    op = torch.eq if immediate else torch.ge
    return op(text_time[:, None, :, None], media_time[None, None, None, :])


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

    def forward(self, x, keys, values, text_time, tokens_per_media: int, immediate: bool) -> torch.Tensor:
        num_media = keys.shape[2] // tokens_per_media
        q = self.to_q(self.norm(x)).unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
        mask = media_attention_mask(text_time, num_media, tokens_per_media, immediate)
        # Tokens before the first image see nothing: give them a harmless full row (a fully masked row makes NaNs)
        # and zero their output exactly.
        has_media = (text_time > 0)[:, None, :, None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask | ~has_media)
        out = out * has_media
        return self.to_out(out.transpose(1, 2).flatten(-2))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, dim_visual: int, cfg: CrossAttentionConfig):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, cfg.heads, cfg.dim_head)
        self.attn_gate = nn.Parameter(torch.tensor([cfg.gate_init]))
        self.ff = FeedForward(dim, cfg.ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([cfg.gate_init]))
        self.only_attend_immediate_media = cfg.only_attend_immediate_media
        if cfg.zero_init_output:
            nn.init.zeros_(self.attn.to_out.weight)
            nn.init.zeros_(self.ff.fc2.weight)

    def forward(self, x, keys, values, text_time, tokens_per_media: int) -> torch.Tensor:
        attn = self.attn(x, keys, values, text_time, tokens_per_media, self.only_attend_immediate_media)
        x = x + self.attn_gate.tanh() * attn
        return x + self.ff_gate.tanh() * self.ff(x)
