"""The sample streams: shards -> parsed samples -> shuffle buffer -> decoded, tokenized -> batches.

The data order is made of `streams` independent streams, a number that does not depend on how many processes or
workers read them; that is what lets a run resume on another number of processes in the same global order. Stream
j reads every streams-th shard from j of each epoch's shard permutation (seeded by (seed, epoch)) through its own
shuffle buffer, and contributes `batch_size / (streams per process)` rows to its process's batch at every step: the
global batch of a step is the streams' chunks in stream order, and process r holds streams [r*S, (r+1)*S).

Everything a stream does is a deterministic function of (seed, epoch, stream) and its saved state, so the state
after any chunk is small and exact:
- `epoch`, `shard` (position in the stream's shard list for that epoch) and `offset` (byte offset of the next
  sample in that shard);
- the shuffle buffer and the samples waiting to be batched (packing pool), as references (shard, byte offset):
  on restore they are read again (one seek each on local files) instead of being stored in the checkpoint;
- the shuffle RNG's state, the chunks made, and the counters of good, truncated and bad samples.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..config_loader import from_dict
from ..errors import InputError
from .batching import PIXELS, Batcher, MediaLayout, PackingConfig, PreparedSample
from .features import FeatureCache
from .images import ImageLimits, decode_image
from .samples import UNDECODABLE_IMAGE, BadSample, Sample, sample_from_members
from .shards import check_local_shards, expand_shards, read_samples_at, read_shard
from .text import FormatConfig, SampleFormatter

logger = logging.getLogger(__name__)
STATE_VERSION = 2
WARN_FIRST_BAD = 20  # per stream: the first bad samples are warnings, the rest debug lines (counts are kept)

Preprocess = Callable[[Image.Image], torch.Tensor]


class BadDataError(ValueError):
    """Too many bad samples in one shard."""


@dataclass
class DatasetConfig:
    shards: str | list[str]  # paths, brace patterns, directories of *.tar, `pipe:` commands
    batch_size: int  # samples per batch, or rows per batch when packing
    format: FormatConfig = field(default_factory=FormatConfig)
    packing: PackingConfig | None = None  # None: padded batches, one sample per row
    images: ImageLimits = field(default_factory=ImageLimits)
    shuffle_buffer: int = 1000  # samples; 1 keeps shard order
    shuffle_shards: bool = True
    epochs: int | None = None  # None repeats forever, each epoch with its own shard order
    seed: int = 0
    # Streams of the data order over all processes (module docstring); unset: processes x num_workers (fewer where
    # the batch or the shards do not divide), or on resume the checkpoint's. Any number of processes that divides
    # it can resume the run. Set it to e.g. 8 or 64 when a run may move to another machine count.
    streams: int | None = None
    max_bad_fraction: float | None = 0.1  # per shard; None never stops
    # Used by the loaders (loader.py), not by the stream itself:
    num_workers: int = 1  # worker processes, each reading some of the process's streams; 0: the main process
    prefetch_factor: int = 2  # batches each worker prepares ahead
    loss_weight: float = 1.0  # for mixtures: how much this dataset's loss counts

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetConfig:
        """From plain values (a TOML table): `format`, `images` and `packing` may be nested tables."""
        return from_dict(cls, data, "dataset")


class ShardStream(IterableDataset):
    """An IterableDataset of this process's streams: yields `(stream, chunk, state)` with each stream's next chunk
    (a batch dict for `model(**batch)`, or None once the stream has ended) and its state right after it, round-robin
    over the streams a worker reads. The loader (loader.py) puts a step's chunks together and keeps the states.

    With a `features` cache (features.py) images are looked up by their bytes instead of decoded and preprocessed,
    and batches hold the encoder's tokens as `image_features` (B, T_img, 1, num_tokens, dim) instead of `images`.
    """

    def __init__(
        self,
        config: DatasetConfig,
        tokenizer,
        preprocess: Preprocess,
        rank: int = 0,
        world_size: int = 1,
        features: FeatureCache | None = None,
    ):
        self.config = config
        self.urls = expand_shards(config.shards)
        check_local_shards(self.urls)
        self.formatter = SampleFormatter(tokenizer, config.format)
        self.preprocess = preprocess
        self.features = features
        self.media = (
            PIXELS if features is None else MediaLayout("image_features", features.shape, features.dtype)
        )
        self.rank, self.world_size = rank, world_size
        self.fingerprint = hashlib.sha1("\n".join(self.urls).encode()).hexdigest()[:16]
        self.restored: dict[int, dict[str, Any]] = {}  # stream -> state to continue from
        self.set_streams(config.streams or default_streams(config, world_size, len(self.urls)))

    def set_streams(self, num_streams: int) -> None:
        """Lay out `num_streams` streams over the processes: this process's streams and their chunk size."""
        per_process, rest = divmod(num_streams, self.world_size)
        if num_streams < 1 or rest:
            raise InputError(
                f"the data order has {num_streams} streams, which {self.world_size} processes cannot share evenly; "
                f"run on a number of processes that divides {num_streams}"
            )
        if len(self.urls) < num_streams:
            raise InputError(
                f"{len(self.urls)} shards cannot feed {num_streams} streams ({per_process} per process on "
                f"{self.world_size}); every stream needs at least one shard"
            )
        if self.config.batch_size % per_process:
            raise InputError(
                f"batch_size {self.config.batch_size} per process is not divisible by its {per_process} streams "
                f"({num_streams} streams over {self.world_size} processes)"
            )
        self.num_streams = num_streams
        self.streams = list(range(self.rank * per_process, (self.rank + 1) * per_process))
        self.chunk_rows = self.config.batch_size // per_process

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor] | None, dict[str, Any]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = [_Stream(self, j, self.restored.get(j)) for j in self.streams[worker::num_workers]]
        running = [(stream, iter(stream)) for stream in streams]
        while running:
            for item in list(running):
                stream, chunks = item
                chunk = next(chunks, None)
                if chunk is None:
                    running.remove(item)
                yield stream.index, chunk, stream.snapshot()


def default_streams(config: DatasetConfig, world_size: int, num_shards: int) -> int:
    """Processes x the most workers (up to num_workers) whose streams divide the batch and have a shard each."""
    per_process = max(1, min(config.num_workers, num_shards // world_size))
    return world_size * max(d for d in range(1, per_process + 1) if config.batch_size % d == 0)


class _Stream:
    def __init__(self, source: ShardStream, index: int, state: dict[str, Any] | None):
        config = source.config
        self.source, self.config, self.index = source, config, index
        self.batcher = Batcher(source.chunk_rows, source.formatter.pad_id, config.packing, source.media)
        self.buffer: list[tuple[tuple[int, int], Sample]] = []  # ((url index, offset), parsed sample)
        self.reader: Iterator | None = None
        self.chunks = 0
        self.counts: dict[str, Any] = {"samples": 0, "truncated": 0, "bad": {}}
        self.shard_counts: dict[int, list[int]] = {}  # url index -> [samples seen, bad]; current epoch
        self.finished_shards: set[int] = set()
        self.read_this_epoch = 0
        if state:
            self._restore(state)
        else:
            self.epoch, self.shard, self.offset = 0, 0, 0
            # The seed a process's single worker had before streams existed: one-stream-per-process runs keep
            # their data order.
            self.rng = np.random.default_rng([config.seed, index, 0])
        self.shard_list = self._shards_for_epoch(self.epoch)

    # ----- state ---------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What a saved state must have been made by: the same shards, seed, streams and rows per chunk."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.source.fingerprint,
            "seed": self.config.seed,
            "stream": self.index,
            "num_streams": self.source.num_streams,
            "chunk_rows": self.source.chunk_rows,
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            **self._identity(),
            "chunks": self.chunks,
            "epoch": self.epoch,
            "shard": self.shard,
            "offset": self.offset,
            "buffer": [list(ref) for ref, _ in self.buffer],
            "pending": [list(sample.ref) for sample in self.batcher.pending],
            "rng": self.rng.bit_generator.state,
            "counts": {**self.counts, "bad": dict(self.counts["bad"])},
            "shard_counts": {str(k): list(v) for k, v in self.shard_counts.items()},
            "finished_shards": sorted(self.finished_shards),
            "read_this_epoch": self.read_this_epoch,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        for name, value in self._identity().items():
            if state.get(name) == value:
                continue
            if name == "chunk_rows":
                raise InputError(
                    f"the saved data order takes {state[name]} rows per stream and step (a global batch of "
                    f"{state[name] * self.source.num_streams}) but this run takes {value} (a global batch of "
                    f"{value * self.source.num_streams}); keep the global batch_size to resume"
                )
            what = "shard list" if name == "fingerprint" else name
            raise InputError(
                f"loader state was saved with {what}={state.get(name)!r} but this loader has {value!r}; "
                "resume with the same shards, seed, streams and global batch size"
            )
        self.chunks = state["chunks"]
        self.epoch, self.shard, self.offset = state["epoch"], state["shard"], state["offset"]
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.counts = {**state["counts"], "bad": dict(state["counts"]["bad"])}
        self.shard_counts = {int(k): list(v) for k, v in state["shard_counts"].items()}
        self.finished_shards = set(state["finished_shards"])
        self.read_this_epoch = state["read_this_epoch"]
        raw = _fetch(self.source.urls, [tuple(ref) for ref in state["buffer"] + state["pending"]])
        self.buffer = [
            (tuple(ref), sample_from_members(raw[tuple(ref)].key, raw[tuple(ref)].members))
            for ref in state["buffer"]
        ]
        for ref in state["pending"]:
            sample = sample_from_members(raw[tuple(ref)].key, raw[tuple(ref)].members)
            prepared = self._prepare(tuple(ref), sample, count=False)
            if prepared is None:
                raise InputError(
                    f"sample at {self.source.urls[ref[0]]} offset {ref[1]} was good and is now bad"
                )
            self.batcher.pending.append(prepared)

    def _shards_for_epoch(self, epoch: int) -> list[int]:
        n = len(self.source.urls)
        order = (
            np.random.default_rng([self.config.seed, epoch]).permutation(n)
            if self.config.shuffle_shards
            else np.arange(n)
        )
        return [int(i) for i in order[self.index :: self.source.num_streams]]

    # ----- the pipeline --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            item = self._next_shuffled()
            if item is None:
                break
            prepared = self._prepare(*item)
            if prepared is not None:
                self.batcher.add(prepared)
            if self.batcher.ready():
                self.chunks += 1
                yield self.batcher.pop_batch()
        while (batch := self.batcher.pop_batch()) is not None:
            self.chunks += 1
            yield batch

    def _next_shuffled(self) -> tuple[tuple[int, int], Sample] | None:
        while len(self.buffer) < max(self.config.shuffle_buffer, 1):
            item = self._read_next()
            if item is None:
                break
            self.buffer.append(item)
        if not self.buffer:
            return None
        i = int(self.rng.integers(len(self.buffer)))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def _read_next(self) -> tuple[tuple[int, int], Sample] | None:
        """The next parsed sample in shard order (bad ones counted and skipped), moving through shards and epochs."""
        while True:
            if self.shard >= len(self.shard_list):
                if self.config.epochs is not None and self.epoch + 1 >= self.config.epochs:
                    return None
                if self.read_this_epoch == 0:
                    shards = [self.source.urls[i] for i in self.shard_list]
                    raise InputError(
                        f"stream {self.index} read no sample in a whole epoch of shards {shards}"
                    )
                self.epoch, self.shard, self.offset, self.read_this_epoch = self.epoch + 1, 0, 0, 0
                self.shard_list = self._shards_for_epoch(self.epoch)
                self.shard_counts, self.finished_shards = {}, set()
            index = self.shard_list[self.shard]
            if self.reader is None:
                self.reader = read_shard(self.source.urls[index], self.offset)
            try:
                raw = next(self.reader)
            except StopIteration:
                self._finish_shard(index)
                continue
            except BadSample as bad:  # truncated or unreadable shard: it ends here
                self._count_seen(index)
                self._record_bad(index, bad)
                self._finish_shard(index)
                continue
            self.offset = raw.end
            self.read_this_epoch += 1
            self._count_seen(index)
            try:
                return (index, raw.offset), sample_from_members(raw.key, raw.members)
            except BadSample as bad:
                self._record_bad(index, bad)

    def _finish_shard(self, index: int) -> None:
        self.reader = None
        self.shard, self.offset = self.shard + 1, 0
        self.finished_shards.add(index)
        seen, bad = self.shard_counts.get(index, [0, 0])
        if bad:
            logger.info("shard %s: %d of %d samples bad so far", self.source.urls[index], bad, seen)
        self._check_bad_fraction(index)

    def _prepare(self, ref: tuple[int, int], sample: Sample, count: bool = True) -> PreparedSample | None:
        """Tokenize, decode and preprocess the images that survive truncation (or look up their cached encoder
        tokens); None (counted) if bad."""
        try:
            tokens = self.source.formatter.format_sample(sample)
            kept = sample.images[: tokens.num_images]
            if self.source.features is not None:
                where = f"{self.source.urls[ref[0]]}: {sample.key}"
                pixels = [
                    self.source.features.lookup(item.data, f"{where}.{item.extension}") for item in kept
                ]
            else:
                images = [
                    decode_image(item.data, f"{sample.key}.{item.extension}", self.config.images)
                    for item in kept
                ]
                try:
                    pixels = [self.source.preprocess(image) for image in images]
                except Exception as error:  # odd images (1x1, extreme aspect) can break a preprocess
                    raise BadSample(UNDECODABLE_IMAGE, f"{sample.key}: preprocess failed: {error}") from None
        except BadSample as bad:
            if count:
                self._record_bad(ref[0], bad)
            return None
        if count:
            self.counts["samples"] += 1
            self.counts["truncated"] += int(tokens.truncated)
        return PreparedSample(tokens.input_ids, tokens.labels, pixels, ref)

    # ----- bad samples ---------------------------------------------------------------------------------------
    def _count_seen(self, index: int) -> None:
        self.shard_counts.setdefault(index, [0, 0])[0] += 1

    def _record_bad(self, index: int, bad: BadSample) -> None:
        self.counts["bad"][bad.reason] = self.counts["bad"].get(bad.reason, 0) + 1
        self.shard_counts.setdefault(index, [0, 0])[1] += 1
        total_bad = sum(self.counts["bad"].values())
        level = logging.WARNING if total_bad <= WARN_FIRST_BAD else logging.DEBUG
        logger.log(level, "skipped a bad sample in %s: %s", self.source.urls[index], bad)
        if index in self.finished_shards:
            self._check_bad_fraction(index)

    def _check_bad_fraction(self, index: int) -> None:
        limit = self.config.max_bad_fraction
        seen, bad = self.shard_counts.get(index, [0, 0])
        if limit is not None and bad > limit * max(seen, 1):
            raise BadDataError(
                f"shard {self.source.urls[index]}: {bad} of {seen} samples bad ({bad / max(seen, 1):.0%} > "
                f"max_bad_fraction={limit:.0%}); bad so far in this stream: {self.counts['bad']}"
            )


def _fetch(urls: list[str], refs: list[tuple[int, int]]) -> dict[tuple[int, int], Any]:
    by_shard: dict[int, list[int]] = {}
    for index, offset in refs:
        by_shard.setdefault(index, []).append(offset)
    found = {}
    for index, offsets in by_shard.items():
        for offset, raw in read_samples_at(urls[index], offsets).items():
            found[(index, offset)] = raw
    return found
