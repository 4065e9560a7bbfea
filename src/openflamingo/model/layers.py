"""Building blocks the perceiver and the gated cross-attention blocks are made of, chosen by their configs.

The family's members differ only in these: OpenFlamingo uses LayerNorm and a GELU feed-forward everywhere; IDEFICS uses
a ReLU feed-forward in the perceiver, RMSNorm and the language model's own SwiGLU feed-forward in the cross-attention
blocks, and optional per-head q/k norms in both.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "relu"]
FeedForwardKind = Literal["gelu", "relu", "swiglu"]


def make_norm(kind: Norm, dim: int, eps: float = 1e-5) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    return nn.RMSNorm(dim, eps=eps)


class FeedForward(nn.Module):
    """norm -> Linear -> GELU or ReLU -> Linear, no biases in the projections."""

    def __init__(self, dim: int, hidden: int, activation: Activation = "gelu", norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm if norm is not None else nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.activation = F.gelu if activation == "gelu" else F.relu

    @property
    def output(self) -> nn.Linear:
        return self.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(self.norm(x))))


class SwiGLUFeedForward(nn.Module):
    """norm -> down(silu(gate(x)) * up(x)): the LLaMA MLP (Shazeer 2020), as IDEFICS' cross-attention blocks use it."""

    def __init__(self, dim: int, hidden: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    @property
    def output(self) -> nn.Linear:
        return self.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_feed_forward(kind: FeedForwardKind, dim: int, hidden: int, norm: nn.Module) -> nn.Module:
    if kind == "swiglu":
        return SwiGLUFeedForward(dim, hidden, norm)
    return FeedForward(dim, hidden, kind, norm)
