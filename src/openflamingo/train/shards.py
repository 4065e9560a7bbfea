"""The "shards" loader: tar shards read by openflamingo.data, behind the training loop's loader contract.

A dataset's `path` is a shard pattern (paths, brace patterns, folders, `pipe:` commands) or `easy-vqa:LAYOUT`
(`pairs`, `vqa`, `fewshot`): easy-VQA's training split converted once into cached shards (the demo's data).
Options (`[datasets.NAME.options]`): `num_workers` (default 1), `shuffle_buffer` (1000), `shots` (easy-VQA
few-shot documents, 4), `row_tokens` (pack samples into rows of this many tokens; unset: padded batches).
"""

from __future__ import annotations

from typing import Any

from ..backbones import cache_dir
from .config import DataConfig, DatasetConfig
from .data import rank_batch_size

OPTIONS = {"num_workers": 1, "shuffle_buffer": 1000, "shots": 4, "row_tokens": None}


class StepIterator:
    """`next()` gives one micro-step `{dataset: batch}` of a MixedLoader; the state is the loader's own."""

    def __init__(self, mixed):
        self.mixed = mixed
        self._steps = None

    def __iter__(self) -> StepIterator:
        return self

    def __next__(self) -> dict[str, dict[str, Any]]:
        if self._steps is None:
            self._steps = iter(self.mixed)
        return next(self._steps)

    def state_dict(self) -> dict[str, Any]:
        return self.mixed.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixed.load_state_dict(state)
        self._steps = None


def shard_paths(name: str, dataset: DatasetConfig, options: dict[str, Any]) -> str | list[str]:
    if not dataset.path:
        raise ValueError(f"datasets.{name}.path: the shards loader needs shard paths or easy-vqa:LAYOUT")
    if dataset.path.startswith("easy-vqa:"):
        from ..data.convert import easy_vqa_shards

        layout = dataset.path.split(":", 1)[1]
        return easy_vqa_shards(cache_dir() / "data", layout, "train", shots=options["shots"])
    return dataset.path


def build_shard_loader(
    datasets: dict[str, DatasetConfig], data: DataConfig, model, rank: int, world_size: int, seed: int
) -> StepIterator:
    from ..data import DatasetConfig as ShardDataset
    from ..data import FormatConfig, MixedLoader, PackingConfig

    configs = {}
    for name, dataset in datasets.items():
        unknown = sorted(set(dataset.options) - set(OPTIONS))
        if unknown:
            raise ValueError(
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
            ),
            packing=PackingConfig(row_tokens=row_tokens) if row_tokens else None,
            shuffle_buffer=options["shuffle_buffer"],
            seed=seed,
            num_workers=options["num_workers"],
            loss_weight=dataset.loss_weight,
        )
    preprocess = model.vision_encoder.preprocess_image
    return StepIterator(MixedLoader(configs, model.tokenizer, preprocess, rank=rank, world_size=world_size))
