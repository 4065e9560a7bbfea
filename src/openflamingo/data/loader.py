"""Loaders: one dataset (ShardLoader) or several mixed, each with its own batch size and loss weight (MixedLoader).

A ShardLoader reads its process's streams (dataset.py) in torch DataLoader workers; every chunk arrives with its
stream's state right after it, and a step's batch is handed out only when every stream's chunk for it is there.
The loader's `state_dict()` is the states of exactly the chunks handed out so far (not of the ones still
prefetched), keyed by stream, so the states of all processes together describe the global data position: a run
resumes on another number of processes by merging them (`merge_state_dicts`) and loading the merge.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import InputError
from .batching import concat_batches
from .dataset import DatasetConfig, Preprocess, ShardStream
from .features import FeatureCache

STATE_FORMAT = "openflamingo-streams/1"


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardLoader:
    """Batches of one dataset for this process; iterate it, and save/restore `state_dict()` with checkpoints.

    Iterating again continues where the batches handed out so far end. Resume with the same shards, seed, global
    batch size and streams, on any number of processes that divides the streams. With `epochs=None` (the default)
    iteration never ends: each stream moves on to the next epoch (a new shard order) by itself. With `features`
    (a FeatureCache of the frozen encoder's output) batches carry `image_features` instead of `images`.
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
        self.multiprocessing_context = multiprocessing_context
        self._states: dict[int, dict[str, Any]] = {}  # stream -> its state after its last chunk handed out

    @property
    def num_workers(self) -> int:
        """The most workers, up to num_workers, that read the same number of streams each: with round-robin
        delivery the chunks of a step then arrive together."""
        streams = len(self.dataset.streams)
        return max(w for w in range(min(self.config.num_workers, streams) + 1) if w == 0 or streams % w == 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.dataset.restored = dict(self._states)
        workers = self.num_workers
        # The workers are forked here, in the caller's thread: a fork from a background thread (the training
        # loop's prefetcher) can crash the child while other threads hold locks.
        items = iter(
            DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=workers,
                prefetch_factor=self.config.prefetch_factor if workers else None,
                multiprocessing_context=self.multiprocessing_context if workers else None,
            )
        )
        return self._steps(items)

    def _steps(self, items: Iterator) -> Iterator[dict[str, torch.Tensor]]:
        """Each step's batch once every running stream's chunk for it has arrived, in stream order."""
        running = set(self.dataset.streams)
        arrived: dict[int, dict[int, tuple[dict, dict]]] = {}  # chunk number -> stream -> (chunk, its state)
        step = 1 + max((state["chunks"] for state in self._states.values()), default=0)
        for stream, chunk, state in items:
            if chunk is None:
                running.discard(stream)
                self._states[stream] = state
            else:
                arrived.setdefault(state["chunks"], {})[stream] = (chunk, state)
            while (ready := arrived.get(step)) and running <= ready.keys():
                del arrived[step]
                step += 1
                for j, (_, state) in ready.items():
                    self._states[j] = state
                yield concat_batches([ready[j][0] for j in sorted(ready)], self.dataset.formatter.pad_id)

    def stats(self) -> dict[str, Any]:
        """Samples used, truncated, and skipped by reason, summed over this process's streams, as of the batches
        handed out so far."""
        total: dict[str, Any] = {"samples": 0, "truncated": 0, "bad": {}}
        for state in self._states.values():
            counts = state["counts"]
            total["samples"] += counts["samples"]
            total["truncated"] += counts["truncated"]
            for reason, n in counts["bad"].items():
                total["bad"][reason] = total["bad"].get(reason, 0) + n
        return total

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the format, the number of streams and this process's streams' states (keys are strings)."""
        streams = {str(j): state for j, state in sorted(self._states.items())}
        return {"format": STATE_FORMAT, "num_streams": self.dataset.num_streams, "streams": streams}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state of this loader, or from the merge of several processes' states (any number of
        processes that divides the streams); the streams' own checks (shards, seed, rows per stream) run when
        iteration starts."""
        if state.get("format") != STATE_FORMAT:
            raise InputError(
                "loader state is not a stream state (it was written before openflamingo's data order was made of "
                "streams); resume it with the openflamingo version that wrote it"
            )
        saved = state["num_streams"]
        if self.config.streams is not None and self.config.streams != saved:
            raise InputError(
                f"the saved data order has {saved} streams but this run asks for streams = {self.config.streams}; "
                f"leave streams unset or set it to {saved}"
            )
        if saved != self.dataset.num_streams:
            self.dataset.set_streams(saved)
        streams = {int(j): s for j, s in state["streams"].items()}
        missing = [j for j in self.dataset.streams if j not in streams]
        if streams and missing:
            raise InputError(
                f"loader state has no entry for stream {missing[0]} (it holds streams {sorted(streams)} of {saved}); "
                "load the merge of every process's state (merge_state_dicts)"
            )
        self._states = {j: streams[j] for j in self.dataset.streams if j in streams}

    @staticmethod
    def merge_state_dicts(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One state holding the streams of several processes' states (each process's `state_dict()`)."""
        formats = {(s.get("format"), s.get("num_streams")) for s in states}
        if len(formats) != 1:
            raise InputError(
                f"loader states of different layouts cannot be merged: {sorted(map(str, formats))}"
            )
        return {**states[0], "streams": {j: s for state in states for j, s in state["streams"].items()}}


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
        return self._steps({name: iter(loader) for name, loader in self.loaders.items()})  # workers start now

    @staticmethod
    def _steps(iterators: dict[str, Iterator]) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
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
            try:
                loader.load_state_dict(state[name])
            except InputError as error:
                raise InputError(f"datasets.{name}: {error}") from None

    def merge_state_dicts(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        return {name: ShardLoader.merge_state_dicts([s[name] for s in states]) for name in self.loaders}
