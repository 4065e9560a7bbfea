"""The demo recipe's training step on one fixed synthetic batch of its shapes, for the CPU benchmarks that time it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from openflamingo.model.checkpoint import build_or_load
from openflamingo.model.flamingo import Flamingo
from openflamingo.train.config import TrainConfig, load_config
from openflamingo.train.data import build_loader
from openflamingo.train.loop import forward_backward
from openflamingo.train.optim import build_optimizer
from openflamingo.train.prefetch import prepare_batch

RECIPE = Path(__file__).parents[1] / "configs" / "demo.toml"


def demo_step(overrides: list[str] | None = None) -> tuple[Flamingo, Callable[[], float]]:
    """(model, step) where step() runs forward + backward of every dataset, clip and AdamW, and returns seconds."""
    config = load_config(RECIPE, ["--data.loader", "synthetic", *(overrides or [])])
    torch.manual_seed(0)
    model = build_or_load(config.model, seed=0).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-5))
    loader = build_loader(config.enabled_datasets(), config.data, model, rank=0, world_size=1, seed=0)
    batches = {name: prepare_batch(model, batch) for name, batch in next(loader).items()}
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        start = time.perf_counter()
        for batch in batches.values():
            forward_backward(model, batch, 1.0, torch.device("cpu"), None)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return model, step
