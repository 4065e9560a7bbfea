"""AdamW over the trainable parameters, with weight decay where the recipe says, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from .config import TrainConfig


def decays(name: str, param: torch.Tensor, rule: str) -> bool:
    """Gates, norms and biases (all < 2-D) never decay. "cross_attention" follows OpenFlamingo's train.py, which
    decays only the cross-attention blocks' matrices; "matrices" decays every trainable matrix (nanoGPT)."""
    if rule == "none" or param.ndim < 2:
        return False
    if rule == "cross_attention":
        return name.startswith("cross_attn_blocks.")
    return True


def is_under(name: str, prefix: str) -> bool:
    """Whether parameter `name` is `prefix` or inside it (prefixes end at a dot boundary)."""
    return name == prefix or name.startswith(prefix + ".")


def lr_scale(name: str, scales: dict[str, float]) -> float:
    """The multiplier of the longest prefix of `name` in `scales`; 1.0 when none matches."""
    matches = [p for p in scales if is_under(name, p)]
    return scales[max(matches, key=len)] if matches else 1.0


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise InputError("the model has no trainable parameters")
    for prefix in config.lr_scale:
        if not any(is_under(n, prefix) for n, _ in named):
            raise InputError(f"train.lr_scale.{prefix}: names no trainable parameter (e.g. {named[0][0]})")
    groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
    for name, param in named:
        key = (decays(name, param, config.decay), lr_scale(name, config.lr_scale))
        groups.setdefault(key, []).append(param)
    return torch.optim.AdamW(
        [
            {"params": params, "weight_decay": config.weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), params in sorted(groups.items())
        ],
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        # One kernel per parameter group instead of a dozen elementwise passes; it also skips a step on the device
        # when `optimizer.found_inf` is set, so a non-finite step needs no host check (see train/loop.py).
        fused=True,
    )


class LRSchedule:
    """lr(step) for optimizer step `step` (0-based): linear warmup from lr/warmup to lr, then constant, linear or
    cosine decay to min_lr at `config.steps`; with `decay_steps`, the lr holds until the last `decay_steps` steps and
    decays over those alone (warmup-stable-decay). Pure function of the step, so its state is the step alone."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.step = 0

    def lr(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return c.lr
        decay_start = (
            c.warmup_steps if c.decay_steps is None else max(c.warmup_steps, c.steps - c.decay_steps)
        )
        progress = min(1.0, max(0, step - decay_start) / max(1, c.steps - decay_start))
        if c.schedule == "linear":
            return c.lr + (c.min_lr - c.lr) * progress
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Set the lr of the step about to be taken (times each parameter group's `lr_scale`); returns the base lr."""
        lr = self.lr(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
