"""Loaders: one dataset (ShardLoader) or several mixed, each with its own batch size and loss weight (MixedLoader).

Exact resume rests on torchdata's StatefulDataLoader: every worker sends its dataset state along with each batch
(`snapshot_every_n_steps=1`), so the loader's `state_dict()` describes exactly the batches handed out so far, not
the ones still prefetched in worker queues, and it restores which worker's batch comes next. The per-worker part
(shard position, shuffle buffer, RNG) is ShardStream's, in dataset.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from ..errors import InputError
from .dataset import DatasetConfig, Preprocess, ShardStream
from .features import FeatureCache

# torchdata 0.11 calls torch.set_vital on every iteration, which newer torch deprecates with a warning each time.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardLoader:
    """Batches of one dataset for this rank; iterate it, and save/restore `state_dict()` with checkpoints.

    Resume with the same shards, seed, batch size, ranks and workers. With `epochs=None` (the default) iteration
    never ends: each worker moves on to the next epoch (a new shard order) by itself. With `features` (a
    FeatureCache of the frozen encoder's output) batches carry `image_features` instead of `images`.
    """

    def __init__(
        self,
        config: DatasetConfig,
        tokenizer,
        preprocess: Preprocess,
        rank: int | None = None,
        world_size: int | None = None,
        multiprocessing_context: str | None = None,
        features: FeatureCache | None = None,
    ):
        if rank is None or world_size is None:
            rank, world_size = _distributed_rank_and_size()
        self.config = config
        self.dataset = ShardStream(config, tokenizer, preprocess, rank, world_size, features)
        # A worker without shards would only idle; fewer workers keep the batch order independent of that.
        self.num_workers = min(config.num_workers, self.dataset.shards_per_rank())
        self.loader = StatefulDataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=config.prefetch_factor if self.num_workers else None,
            snapshot_every_n_steps=1,
            multiprocessing_context=multiprocessing_context if self.num_workers else None,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.loader)

    def stats(self) -> dict[str, Any]:
        """Samples used, truncated, and skipped by reason, summed over this rank's workers, as of the batches
        handed out so far (read from the loader state, which holds each worker's counts)."""
        total: dict[str, Any] = {"samples": 0, "truncated": 0, "bad": {}}
        for worker_state in _worker_states(self.loader.state_dict()):
            counts = worker_state["counts"]
            total["samples"] += counts["samples"]
            total["truncated"] += counts["truncated"]
            for reason, n in counts["bad"].items():
                total["bad"][reason] = total["bad"].get(reason, 0) + n
        return total

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def _worker_states(state: Any) -> Iterator[dict[str, Any]]:
    """ShardStream's per-worker states wherever StatefulDataLoader nests them (found by their own keys)."""
    if isinstance(state, dict):
        if "fingerprint" in state and "counts" in state:
            yield state
            return
        for value in state.values():
            yield from _worker_states(value)


class MixedLoader:
    """Several datasets at once: each step yields `{name: batch}` with one batch of every dataset.

    Each dataset keeps its own batch size, packing, workers and `loss_weight` (`loss_weights` maps names to them;
    the trainer sums `loss_weight * loss` over the step's batches, as OpenFlamingo does for LAION + MMC4). Any
    subset of datasets may be configured. A finite dataset that ends leaves the mixture; the mixture ends when all
    have ended.
    """

    def __init__(
        self,
        configs: dict[str, DatasetConfig],
        tokenizer,
        preprocess: Preprocess,
        rank: int | None = None,
        world_size: int | None = None,
        multiprocessing_context: str | None = None,
        features: FeatureCache | None = None,
    ):
        if not configs:
            raise InputError("a data mixture needs at least one dataset")
        self.loaders = {
            name: ShardLoader(
                config, tokenizer, preprocess, rank, world_size, multiprocessing_context, features
            )
            for name, config in configs.items()
        }
        self.loss_weights = {name: config.loss_weight for name, config in configs.items()}

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        while iterators:
            step = {}
            for name in list(iterators):
                batch = next(iterators[name], None)
                if batch is None:
                    del iterators[name]
                else:
                    step[name] = batch
            if step:
                yield step

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: loader.stats() for name, loader in self.loaders.items()}

    def state_dict(self) -> dict[str, Any]:
        return {name: loader.state_dict() for name, loader in self.loaders.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.loaders) - set(state))
        if missing:
            raise InputError(f"loader state has no entry for datasets {missing} (it has {sorted(state)})")
        for name, loader in self.loaders.items():
            loader.load_state_dict(state[name])
