"""What the training loop needs from data, a seeded synthetic source behind that interface, and the plug-in point.

The contract: each `next(loader)` is one micro-step, `{dataset name: batch}` where a batch is what the model takes
as `model(**batch)` (input_ids, attention_mask, labels with -100 where no loss, images (B, T_img, F, C, H, W),
num_images (B,), document_ids (B, L) for packed batches), holding this rank's share of the dataset's
`batch_size`. Any dataset may be absent from a micro-step. `state_dict()` / `load_state_dict()` capture everything
needed to continue with exactly the batches an uninterrupted run would have seen. A loader that can resume on
another number of processes also has `merge_state_dicts(states)`: one state from every process's `state_dict()`,
which `load_state_dict` then takes on each process of the new run.

A real loader plugs in by name: `[data] loader = "package.module:function"` (or a name registered in `LOADERS`),
where `function(datasets, data, model, rank, world_size)` returns such a loader.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from PIL import Image

from ..errors import InputError
from .config import DataConfig, DatasetConfig, rank_batch_size


class TrainLoader(Protocol):
    def __iter__(self) -> Iterator[dict[str, dict[str, Any]]]: ...

    def __next__(self) -> dict[str, dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LoaderBuilder = Callable[..., TrainLoader]


def image_size(model) -> int:
    """The square input size the vision encoder's own preprocessing produces."""
    return int(model.vision_encoder.preprocess([Image.new("RGB", (8, 8))]).shape[-1])


class SyntheticLoader:
    """Random token/image batches shaped like real ones, reproducible from (seed, dataset, global sample index).

    Every sample is a function of its global index, so the union of all ranks' batches equals a single process's
    batch of the same global size, and the state is just the number of micro-steps taken (the same on every rank,
    so a run resumes on any number of processes).
    Samples: `max_images` chunks of `<image> text <|endofchunk|>` of random lengths, right-padded; images on
    padded slots are zero and `num_images` says how many are real; labels ignore padding and `<image>`.
    """

    def __init__(
        self,
        datasets: dict[str, DatasetConfig],
        seed: int,
        special_ids,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.datasets = datasets
        self.seed = seed
        self.ids = special_ids
        self.image_size = image_size
        self.rank, self.world_size = rank, world_size
        self.local = {name: rank_batch_size(name, d, world_size) for name, d in datasets.items()}
        self.step = 0
        for name, d in datasets.items():
            unknown = sorted(set(d.options) - {"image_size"})
            if unknown:
                raise InputError(
                    f"datasets.{name}.options.{unknown[0]}: unknown option of the synthetic loader"
                )
            if d.seq_len < 3 * d.max_images:
                raise InputError(
                    f"datasets.{name}.seq_len: {d.seq_len} is too short for {d.max_images} images"
                )

    def __iter__(self) -> SyntheticLoader:
        return self

    def __next__(self) -> dict[str, dict[str, Any]]:
        out = {}
        for index, (name, d) in enumerate(self.datasets.items()):
            first = self.step * d.batch_size + self.rank * self.local[name]
            samples = [self._sample(index, d, first + i) for i in range(self.local[name])]
            out[name] = self._collate(d, samples)
        self.step += 1
        return out

    def _sample(self, dataset_index: int, d: DatasetConfig, sample_index: int):
        g = torch.Generator().manual_seed(hash((self.seed, dataset_index, sample_index)) & 0x7FFF_FFFF)
        num_images = int(torch.randint(1, d.max_images + 1, (), generator=g))
        chunk = d.seq_len // num_images
        ids: list[int] = []
        for _ in range(num_images):
            length = int(torch.randint(1, chunk - 1, (), generator=g))
            text = torch.randint(0, self.ids.first_added, (length,), generator=g).tolist()
            ids += [self.ids.media, *text, self.ids.end_of_chunk]
        size = int(d.options.get("image_size", self.image_size))
        images = torch.randn(num_images, 1, 3, size, size, generator=g)
        return torch.tensor(ids), images

    def _collate(self, d: DatasetConfig, samples) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _ in samples)
        max_images = max(len(images) for _, images in samples)
        B = len(samples)
        input_ids = torch.full((B, length), self.ids.pad, dtype=torch.long)
        attention_mask = torch.zeros(B, length, dtype=torch.long)
        images = torch.zeros(B, max_images, *samples[0][1].shape[1:])
        for b, (ids, imgs) in enumerate(samples):
            input_ids[b, : len(ids)] = ids
            attention_mask[b, : len(ids)] = 1
            images[b, : len(imgs)] = imgs
        labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == self.ids.media), -100)
        num_images = torch.tensor([len(imgs) for _, imgs in samples])
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            images=images,
            num_images=num_images,
        )

    def state_dict(self) -> dict[str, Any]:
        batch_sizes = {name: d.batch_size for name, d in self.datasets.items()}
        return {"step": self.step, "seed": self.seed, "batch_sizes": batch_sizes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"seed": self.seed, "batch_sizes": {name: d.batch_size for name, d in self.datasets.items()}}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise InputError(
                f"loader state was saved for {theirs}, this run is {mine}; keep the seed and the global batch sizes"
            )
        self.step = int(state["step"])

    @staticmethod
    def merge_state_dicts(states: list[dict[str, Any]]) -> dict[str, Any]:
        if any(state != states[0] for state in states):
            raise InputError(f"the processes' loader states disagree: {states}")
        return states[0]


def build_synthetic_loader(
    datasets: dict[str, DatasetConfig], data: DataConfig, model, rank: int, world_size: int, seed: int
) -> SyntheticLoader:
    return SyntheticLoader(datasets, seed, model.special_ids, image_size(model), rank, world_size)


def build_shard_loader(*args, **kwargs):
    from .shards import build_shard_loader as build  # imports the data package only when it is used

    return build(*args, **kwargs)


# Named loaders; others are named as "module:function".
LOADERS: dict[str, LoaderBuilder] = {"synthetic": build_synthetic_loader, "shards": build_shard_loader}


def resolve_builder(name: str) -> LoaderBuilder:
    if name in LOADERS:
        return LOADERS[name]
    module_name, _, attr = name.partition(":")
    if not attr:
        raise InputError(
            f"data.loader: {name!r} is neither a registered loader ({', '.join(LOADERS)}) nor module:function"
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise InputError(f"data.loader: cannot import {name!r} ({error})") from None


def build_loader(
    datasets: dict[str, DatasetConfig], data: DataConfig, model, rank: int, world_size: int, seed: int
) -> TrainLoader:
    """The loader for this rank; `seed` is data.seed or, when unset, train.seed."""
    builder = resolve_builder(data.loader)
    return builder(datasets, data, model, rank=rank, world_size=world_size, seed=seed)
