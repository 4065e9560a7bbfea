"""The loader: deterministic order, rank/worker split, mixtures, and exact resume in a new process."""

from __future__ import annotations

import json
import multiprocessing.process
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers.data import loader_config, mixed_shards, preprocess
from transformers import AutoTokenizer

from openflamingo.data import DatasetConfig, MixedLoader, ShardLoader

TESTS = Path(__file__).parent
# torchdata 0.11 calls a torch API that newer torch deprecates, on every iteration
pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def assert_same_batches(expected, actual) -> None:
    assert len(expected) == len(actual)
    for b, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert want.keys() == got.keys(), b
        for key in want:
            assert torch.equal(want[key], got[key]), f"batch {b} differs in {key}"


def sample_names(tokenizer, batches) -> list[str]:
    """'number 12' / 'document 3' for every sample in the batches, in order."""
    names = []
    for batch in batches:
        for row in batch["input_ids"]:
            names += re.findall(r"number \d+|document \d+", tokenizer.decode(row))
    return names


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("loader-shards")
    mixed_shards(directory, pairs=24, documents=16, per_shard=5)  # 8 shards
    return str(directory / "shard-{000000..000007}.tar")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_same_seed_same_batches_and_each_epoch_has_its_own_order(shards, tokenizer):
    config = loader_config(shards, num_workers=0, epochs=2)
    first = list(ShardLoader(config, tokenizer, preprocess))
    again = list(ShardLoader(config, tokenizer, preprocess))
    assert_same_batches(first, again)
    names = sample_names(tokenizer, first)
    assert len(names) == 80 and len(set(names)) == 40  # two full epochs
    # Without a shuffle buffer (which carries samples across the epoch boundary) epochs are separate permutations.
    in_shard_order = sample_names(
        tokenizer,
        ShardLoader(loader_config(shards, num_workers=0, epochs=2, shuffle_buffer=1), tokenizer, preprocess),
    )
    assert (
        sorted(in_shard_order[:40]) == sorted(in_shard_order[40:])
        and in_shard_order[:40] != in_shard_order[40:]
    )
    other_seed = sample_names(
        tokenizer, ShardLoader(loader_config(shards, num_workers=0, epochs=2, seed=8), tokenizer, preprocess)
    )
    assert other_seed != names


def test_ranks_and_workers_split_the_shards_without_overlap(shards, tokenizer):
    seen = []
    for rank in range(2):
        config = loader_config(shards, epochs=1, num_workers=2)
        seen += sample_names(tokenizer, ShardLoader(config, tokenizer, preprocess, rank=rank, world_size=2))
    assert len(seen) == 40 and len(set(seen)) == 40


def test_loader_state_is_json_and_holds_the_sample_counts(shards, tokenizer):
    loader = ShardLoader(loader_config(shards), tokenizer, preprocess)
    take(loader, 4)
    json.dumps(loader.state_dict())  # checkpoints can store it as JSON
    stats = loader.stats()
    # each worker's count is as of its last batch handed out: at least the 12 samples of 4 batches of 3
    assert stats["samples"] >= 12 and stats["bad"] == {} and stats["truncated"] == 0


def continue_run(
    shards: str, tokenizer_dir: str, packed: bool, state_file: str, n: int, out_file: str
) -> None:
    """In a fresh process: rebuild the loader, restore the saved state, write the next n batches."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    loader = ShardLoader(loader_config(shards, packed), tokenizer, preprocess)
    loader.load_state_dict(json.loads(Path(state_file).read_text()))
    torch.save(take(loader, n), out_file)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_resume_in_a_new_process_continues_with_exactly_the_same_batches(
    shards, tokenizer, tokenizer_dir, tmp_path, packed
):
    before, after = 9, 10  # with 2 workers x 4 shards of 5 samples this crosses shard and epoch boundaries
    uninterrupted = take(ShardLoader(loader_config(shards, packed), tokenizer, preprocess), before + after)

    loader = ShardLoader(loader_config(shards, packed), tokenizer, preprocess)
    first = take(loader, before)
    state_file, out_file = tmp_path / "state.json", tmp_path / "rest.pt"
    state_file.write_text(json.dumps(loader.state_dict()))
    del loader  # the first process's workers are gone before the second starts reading
    code = (
        "import sys; from test_data_loader import continue_run; "
        f"continue_run({shards!r}, {str(tokenizer_dir)!r}, {packed}, {str(state_file)!r}, {after}, {str(out_file)!r})"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=TESTS, timeout=120)
    rest = torch.load(out_file)
    assert_same_batches(uninterrupted, first + rest)
    if packed:
        assert all("document_ids" in batch for batch in rest)


def test_resume_refuses_a_state_from_a_different_setup(shards, tokenizer):
    loader = ShardLoader(loader_config(shards, num_workers=0), tokenizer, preprocess)
    take(loader, 2)
    state = loader.state_dict()
    other = ShardLoader(loader_config(shards, num_workers=0, seed=99), tokenizer, preprocess)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        take(other, 1)


def test_mixture_yields_each_dataset_with_its_own_batch_size_and_resumes(shards, tokenizer):
    configs = {
        "pairs": loader_config(shards, batch_size=2, num_workers=1, loss_weight=1.0),
        "packed": loader_config(shards, packed=True, batch_size=1, num_workers=1, loss_weight=0.5),
    }
    mixture = MixedLoader(configs, tokenizer, preprocess)
    assert mixture.loss_weights == {"pairs": 1.0, "packed": 0.5}
    steps = take(mixture, 5)
    assert all(step.keys() == {"pairs", "packed"} for step in steps)
    assert all(
        step["pairs"]["input_ids"].shape[0] == 2 and "document_ids" in step["packed"] for step in steps
    )

    mixture = MixedLoader(configs, tokenizer, preprocess)
    take(mixture, 2)
    resumed = MixedLoader(configs, tokenizer, preprocess)
    resumed.load_state_dict(json.loads(json.dumps(mixture.state_dict())))
    for want, got in zip(steps[2:], take(resumed, 3), strict=True):
        for name in want:
            assert_same_batches([want[name]], [got[name]])


def test_a_mixture_of_one_dataset_is_fine_and_of_none_is_an_error(shards, tokenizer):
    only = MixedLoader({"pairs": loader_config(shards, num_workers=0, epochs=1)}, tokenizer, preprocess)
    assert sum(step["pairs"]["input_ids"].shape[0] for step in only) == 40
    with pytest.raises(ValueError, match="at least one dataset"):
        MixedLoader({}, tokenizer, preprocess)


def test_dataset_config_from_a_toml_style_table():
    config = DatasetConfig.from_dict(
        {"shards": "a.tar", "batch_size": 4, "format": {"max_tokens": 64}, "packing": {"row_tokens": 512}}
    )
    assert config.format.max_tokens == 64 and config.packing.row_tokens == 512 and config.loss_weight == 1.0
    with pytest.raises(ValueError, match=r"^dataset\.batchsize: unknown key"):
        DatasetConfig.from_dict({"shards": "a.tar", "batchsize": 4})


def test_workers_start_in_the_thread_that_iterates_not_the_one_that_reads(shards, tokenizer, monkeypatch):
    """The training loop reads batches in a prefetch thread; a fork from there can crash the child, so workers
    start where the iteration (or a restore) begins."""
    started_in = []
    start = multiprocessing.process.BaseProcess.start

    def recording_start(process):
        started_in.append(threading.current_thread())
        start(process)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", recording_start)
    steps = iter(MixedLoader({"pairs": loader_config(shards, num_workers=1)}, tokenizer, preprocess))
    reader = threading.Thread(target=next, args=(steps,))
    reader.start()
    reader.join()
    assert started_in == [threading.main_thread()]
