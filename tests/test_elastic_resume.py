"""A run checkpointed on N processes resumes on M with exactly the samples not yet seen, in the same global order:
the data order is made of streams (openflamingo.data.dataset), each process's loader state holds its streams, and
the merge of all of them continues on any number of processes that divides the streams."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.data import loader_config, mixed_shards, preprocess
from helpers.train import config_of, logged_losses, one_thread, shard_run, tiny_run, torchrun  # noqa: F401
from transformers import AutoTokenizer

from openflamingo.data import DatasetConfig, ShardLoader
from openflamingo.errors import InputError
from openflamingo.train import train
from openflamingo.train.config import to_toml
from openflamingo.train.loop import resume_elsewhere

GLOBAL_BATCH = 4


def make_config(shards: str, packed: bool, **overrides) -> DatasetConfig:
    settings = dict(batch_size=GLOBAL_BATCH, streams=2, num_workers=0, seed=3)
    return loader_config(shards, packed, **{**settings, **overrides})


def loaders(shards: str, tokenizer, packed: bool, world_size: int, **overrides) -> list[ShardLoader]:
    """One loader per process of a world_size-process run, each with its share of the global batch."""
    config = make_config(shards, packed, batch_size=GLOBAL_BATCH // world_size, **overrides)
    return [ShardLoader(config, tokenizer, preprocess, rank, world_size) for rank in range(world_size)]


def rows(batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Each row without its padding: tokens, labels, document ids (packed) and its images."""
    out = []
    for b, mask in enumerate(batch["attention_mask"].bool()):
        row = [batch[key][b][mask] for key in ("input_ids", "labels", "document_ids") if key in batch]
        out.append((*row, batch["images"][b, : batch["num_images"][b]]))
    return out


def global_steps(run: list[ShardLoader], steps: int) -> list[list[tuple[torch.Tensor, ...]]]:
    """The rows of `steps` global batches: every process's batch of a step, rank by rank."""
    per_rank = [[rows(batch) for _, batch in zip(range(steps), loader, strict=False)] for loader in run]
    return [sum(step, []) for step in zip(*per_rank, strict=True)]


def assert_same_rows(expected, actual) -> None:
    assert len(expected) == len(actual)
    for s, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert len(want) == len(got), f"step {s}"
        for r, (a, b) in enumerate(zip(want, got, strict=True)):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"step {s} row {r} differs"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("elastic-shards")
    mixed_shards(directory, pairs=24, documents=16, per_shard=5)  # 8 shards
    return str(directory / "shard-{000000..000007}.tar")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_resume_on_another_number_of_processes_continues_the_global_order(
    shards, tokenizer, packed, before, after
):
    seen, rest = 5, 7  # 2 streams x 4 shards of 5 samples: crosses shard and epoch boundaries
    uninterrupted = global_steps(loaders(shards, tokenizer, packed, 1), seen + rest)
    first = loaders(shards, tokenizer, packed, before)
    head = global_steps(first, seen)
    merged = ShardLoader.merge_state_dicts([loader.state_dict() for loader in first])
    second = loaders(shards, tokenizer, packed, after, streams=None)  # unset: the checkpoint's streams
    for loader in second:
        loader.load_state_dict(merged)
    assert_same_rows(uninterrupted, head + global_steps(second, rest))


def test_the_order_does_not_depend_on_processes_or_workers(shards, tokenizer):
    one = global_steps(loaders(shards, tokenizer, True, 1), 6)
    assert_same_rows(one, global_steps(loaders(shards, tokenizer, True, 2), 6))
    assert_same_rows(one, global_steps(loaders(shards, tokenizer, True, 1, num_workers=2), 6))


def test_a_layout_that_cannot_continue_the_order_is_a_clear_error(shards, tokenizer):
    run = loaders(shards, tokenizer, False, 2)
    global_steps(run, 2)
    merged = ShardLoader.merge_state_dicts([loader.state_dict() for loader in run])
    three = ShardLoader(make_config(shards, False, batch_size=3, streams=None), tokenizer, preprocess, 0, 3)
    with pytest.raises(InputError, match="2 streams, which 3 processes cannot share evenly"):
        three.load_state_dict(merged)
    explicit = ShardLoader(make_config(shards, False, streams=4), tokenizer, preprocess)
    with pytest.raises(InputError, match="asks for streams = 4; leave streams unset or set it to 2"):
        explicit.load_state_dict(merged)
    with pytest.raises(InputError, match="no entry for stream 1"):
        loaders(shards, tokenizer, False, 1)[0].load_state_dict(run[0].state_dict())
    larger = ShardLoader(make_config(shards, False, batch_size=6), tokenizer, preprocess)
    larger.load_state_dict(merged)
    with pytest.raises(
        InputError, match="a global batch of 4.*a global batch of 6.*keep the global batch_size"
    ):
        next(iter(larger))


def test_a_loader_without_merge_names_the_loader_and_the_process_counts(tokenizer_dir, tmp_path):
    class PerProcess:
        def load_state_dict(self, state):
            raise AssertionError("not reached")

    config = config_of(tiny_run(tokenizer_dir, tmp_path, data={"loader": "mypackage.loaders:build"}))
    dist = type("Dist", (), {"world_size": 1})()
    with pytest.raises(
        InputError, match=r"'mypackage.loaders:build' keeps its position per process.*from 2 to 1"
    ):
        resume_elsewhere(PerProcess(), [{}, {}], config, dist)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize(
    "mode, first, then", [("ddp", 2, 1), ("fsdp", 1, 2)], ids=["ddp-2-to-1", "fsdp-1-to-2"]
)
def test_training_moves_between_process_counts_with_the_same_losses(
    tokenizer_dir, tmp_path, caplog, mode, first, then
):
    """4 steps on shards with 2 streams, checkpointed at step 2 on `first` processes and finished on `then`: the
    losses are the uninterrupted single-process run's (DCP reshards the FSDP2 shards of model and optimizer)."""
    mixed_shards(tmp_path / "shards")

    def run_config(name: str, **train_section) -> dict:
        run = shard_run(
            tokenizer_dir, tmp_path / "shards", tmp_path / name, parallel={"mode": mode}, train=train_section
        )
        for dataset in run["datasets"].values():
            dataset["options"]["streams"] = 2
        return run

    reference = train(config_of(run_config("whole"))).losses
    outputs = []
    for processes, steps in ((first, 2), (then, 4)):
        run = run_config("moved", steps=steps)
        if processes == 2:
            config_path = tmp_path / f"moved-{steps}.toml"
            config_path.write_text(to_toml(run))
            outputs.append(torchrun(config_path))
        else:
            with caplog.at_level(logging.INFO, logger="openflamingo"):
                train(config_of(run))
            outputs.append(caplog.text)
    assert logged_losses(tmp_path / "moved") == pytest.approx(reference, rel=1e-5)
    assert f"on {then} processes (written by {first} processes)" in outputs[1]
