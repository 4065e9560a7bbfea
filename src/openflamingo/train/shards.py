"""The "shards" loader: tar shards read by openflamingo.data, behind the training loop's loader contract.

A dataset's `path` is a shard pattern (paths, brace patterns, folders, `pipe:` commands) or `easy-vqa:LAYOUT`
(`pairs`, `vqa`, `fewshot`, `chat`, `binding`): easy-VQA's training split converted once into cached shards (the
demo's data).
Options (`[datasets.NAME.options]`): `num_workers` (default 1), `shuffle_buffer` (1000), `shots` (easy-VQA
few-shot documents, 4), `row_tokens` (pack samples into rows of this many tokens; unset: padded batches), `streams`
(the data order's streams over all processes, openflamingo.data.dataset; unset: processes x workers, or on resume
the checkpoint's; a run resumes on any number of processes that divides it).
With `[data] feature_cache = true` the frozen vision encoder's output for every image of the enabled datasets is
computed once into cache_dir()/features/KEY.safetensors (KEY: the shards, their sizes and times, the encoder's
fingerprint) and the batches carry it as `image_features` instead of `images`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..backbones import cache_dir
from ..errors import InputError
from .config import DataConfig, DatasetConfig, rank_batch_size

OPTIONS = {"num_workers": 1, "shuffle_buffer": 1000, "shots": 4, "row_tokens": None, "streams": None}


class StepIterator:
    """`next()` gives one micro-step `{dataset: batch}` of a MixedLoader; the state is the loader's own. Its workers
    start when it is made or restored, in that thread, not in the thread that later reads it (the prefetcher)."""

    def __init__(self, mixed):
        self.mixed = mixed
        self._steps = iter(mixed)

    def __iter__(self) -> StepIterator:
        return self

    def __next__(self) -> dict[str, dict[str, Any]]:
        return next(self._steps)

    def state_dict(self) -> dict[str, Any]:
        return self.mixed.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixed.load_state_dict(state)
        self._steps = None  # the old workers stop before the new ones start
        self._steps = iter(self.mixed)

    def merge_state_dicts(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        return self.mixed.merge_state_dicts(states)


def shard_paths(name: str, dataset: DatasetConfig, options: dict[str, Any]) -> str | list[str]:
    if not dataset.path:
        raise InputError(f"datasets.{name}.path: the shards loader needs shard paths or easy-vqa:LAYOUT")
    if dataset.path.startswith("easy-vqa:"):
        from ..data.convert import easy_vqa_shards

        layout = dataset.path.split(":", 1)[1]
        return easy_vqa_shards(cache_dir() / "data", layout, "train", shots=options["shots"])
    return dataset.path


def build_shard_loader(
    datasets: dict[str, DatasetConfig], data: DataConfig, model, rank: int, world_size: int, seed: int
) -> StepIterator:
    from ..data import DatasetConfig as ShardDataset
    from ..data import FormatConfig, ImageLimits, MixedLoader, PackingConfig

    limits = ImageLimits()  # the cache must decode as the loader does
    configs = {}
    for name, dataset in datasets.items():
        unknown = sorted(set(dataset.options) - set(OPTIONS))
        if unknown:
            raise InputError(
                f"datasets.{name}.options.{unknown[0]}: unknown option; known: {', '.join(OPTIONS)}"
            )
        options = {**OPTIONS, **dataset.options}
        row_tokens = options["row_tokens"]
        configs[name] = ShardDataset(
            shards=shard_paths(name, dataset, options),
            batch_size=rank_batch_size(name, dataset, world_size),
            format=FormatConfig(
                max_tokens=dataset.seq_len,
                max_images=dataset.max_images,
                prompt_format=model.config.prompt_format,
                special_tokens=model.config.special_tokens,
            ),
            packing=PackingConfig(row_tokens=row_tokens) if row_tokens else None,
            images=limits,
            shuffle_buffer=options["shuffle_buffer"],
            seed=seed,
            streams=options["streams"],
            num_workers=options["num_workers"],
            loss_weight=dataset.loss_weight,
        )
    features = (
        open_feature_cache(configs, model, rank, limits, data.feature_dtype) if data.feature_cache else None
    )
    preprocess = model.vision_encoder.preprocess_image
    mixed = MixedLoader(
        configs, model.tokenizer, preprocess, rank=rank, world_size=world_size, features=features
    )
    return StepIterator(mixed)


def open_feature_cache(configs: dict, model, rank: int, limits, feature_dtype: str = "auto"):
    """The feature cache of all the datasets' shards for this model's vision encoder, built if missing: by local
    rank 0 of each machine while the machine's other ranks wait for the file (no collective: a build can take
    longer than a process group's timeout). `feature_dtype` ("auto" or a FEATURE_DTYPES name) is how it stores
    the tokens."""
    from ..data.features import FEATURE_DTYPES, FeatureCache, build_feature_cache, encoder_fingerprint
    from ..data.shards import expand_shards

    encoder = model.vision_encoder
    if any(p.requires_grad for p in encoder.parameters()):
        raise InputError(
            "data.feature_cache: the vision encoder is trained in this run, so its output changes and cannot be "
            "cached; switch off model.train_vision_encoder or data.feature_cache"
        )
    if any(type(p).__name__ == "DTensor" for p in encoder.parameters()):
        raise InputError(
            'data.feature_cache: the vision encoder is sharded (parallel.mode = "fsdp"); use "ddp" with the cache'
        )
    urls = sorted({url for config in configs.values() for url in expand_shards(config.shards)})
    fingerprint = encoder_fingerprint(model)
    files = [(url, *_size_and_mtime(url)) for url in urls]
    key_parts = [fingerprint, asdict(limits), files]
    if feature_dtype != "auto":  # "auto" keeps the keys of caches built before the option existed
        key_parts.append(feature_dtype)
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:32]
    path = cache_dir() / "features" / f"{key}.safetensors"
    if not path.is_file():
        if int(os.environ.get("LOCAL_RANK", rank)) == 0:
            dtype = FEATURE_DTYPES.get(feature_dtype)
            build_feature_cache(urls, model, path, progress=rank == 0, limits=limits, feature_dtype=dtype)
        while not path.is_file():  # the builder's failure ends the whole job (torchrun), not this loop
            time.sleep(5)
    cache = FeatureCache(path)  # a truncated or corrupt file: a one-line error naming it
    cache.check_fingerprint(fingerprint)  # its name holds the fingerprint too; this catches a copied file
    return cache


def _size_and_mtime(url: str) -> tuple[int | None, int | None]:
    from ..data.shards import PIPE_PREFIX

    if url.startswith(PIPE_PREFIX):
        return None, None  # a command's output: named by the command alone
    stat = Path(url).stat()
    return stat.st_size, stat.st_mtime_ns
