"""Perceiver resampler: a fixed number of learned latents attend over an image's patch tokens.

Follows Flamingo (Alayrac et al. 2022, Sec. 2.1) as OpenFlamingo implements it: the latents attend over the
concatenation `[media tokens; latents]`, each layer adds attention then a GELU feed-forward residually, and a final
LayerNorm closes the stack. Video frames get learned frame embeddings before their tokens are flattened together.
IDEFICS' perceiver is the same with a ReLU feed-forward and, optionally, per-head LayerNorms on queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config_loader import check_choices
from ..errors import InputError
from .layers import Activation, FeedForward


@dataclass
class PerceiverConfig:
    depth: int = 6
    num_latents: int = 64
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    max_num_frames: int | None = None  # learned frame embeddings for video input; None = stills only (F = 1)
    # OpenFlamingo draws the latents from N(0, 1). Latents that large swamp the image-dependent part of the first
    # layer's output; a small std (0.02, as in the Perceiver paper) lets a short run learn from the images.
    latent_init_std: float = 1.0
    activation: Activation = "gelu"  # of the feed-forward
    qk_norm: bool = False  # a LayerNorm over each head's queries and keys

    def __post_init__(self) -> None:
        check_choices(self, "perceiver")


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, qk_norm: bool = False):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim_head) if qk_norm else None
        self.k_norm = nn.LayerNorm(dim_head) if qk_norm else None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, n, h*d) -> (B, T, h, n, d)
        return x.unflatten(-1, (self.heads, self.dim_head)).transpose(-3, -2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (B, T, v, D), latents (B, T, n, D) -> (B, T, n, D)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (self._split_heads(t) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(-3, -2).flatten(-2))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.attn = PerceiverAttention(dim, cfg.heads, cfg.dim_head, cfg.qk_norm)
        self.ff = FeedForward(dim, dim * cfg.ff_mult, cfg.activation)


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim) * cfg.latent_init_std)
        self.frame_embeddings = (
            nn.Parameter(torch.randn(cfg.max_num_frames, dim)) if cfg.max_num_frames is not None else None
        )
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T_img, F, v, D) patch tokens -> (B, T_img, num_latents, D) visual tokens."""
        B, T, num_frames = x.shape[:3]
        if num_frames > 1 or self.frame_embeddings is not None:
            max_frames = 1 if self.frame_embeddings is None else self.frame_embeddings.shape[0]
            if num_frames > max_frames:
                raise InputError(
                    f"images have {num_frames} frames per image but the perceiver supports {max_frames}; "
                    "set perceiver.max_num_frames to enable video input"
                )
            if self.frame_embeddings is not None:
                x = x + self.frame_embeddings[:num_frames, None, :]
        x = x.flatten(2, 3)  # (B, T, F*v, D): all frames of one image form one token set
        latents = self.latents.expand(B, T, *self.latents.shape)
        for layer in self.layers:
            latents = latents + layer.attn(x, latents)
            latents = latents + layer.ff(latents)
        return self.norm(latents)
