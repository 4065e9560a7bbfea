"""Distributed evaluation (2 processes, gloo on CPU) evaluates every example exactly once and agrees with one process."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two processes

F = Path(__file__).parent / "fixtures" / "eval"
TASKS = {
    "hateful_memes": dict(
        annotations=F / "hateful_memes/dev_seen.jsonl",
        train_annotations=F / "hateful_memes/train.jsonl",
        images=F / "hateful_memes",
    ),
    "vqav2": dict(
        questions=F / "vqa/val_questions.json",
        annotations=F / "vqa/val_annotations.json",
        images=F / "vqa/val",
        train_questions=F / "vqa/train_questions.json",
        train_annotations=F / "vqa/train_annotations.json",
        train_images=F / "vqa/train2014",
    ),
}


def evaluate(checkpoint: Path, output_dir: Path) -> None:
    import openflamingo
    from openflamingo.eval import DataPaths, EvalConfig, prepare, run

    for task, paths in TASKS.items():
        config = EvalConfig(
            task, DataPaths(**paths), shots=[1], trials=1, num_samples=5, batch_size=1, num_beams=1,
            max_new_tokens=3, output_dir=output_dir / task, device="cpu", progress=False,
        )  # fmt: skip
        run(openflamingo.load(checkpoint), prepare(config))


def worker(rank: int, world_size: int, port: int, checkpoint: Path, output_dir: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    try:
        evaluate(checkpoint, output_dir)
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):
    from helpers.model import tiny_model

    from openflamingo import save_pretrained

    directory = tmp_path_factory.mktemp("dist") / "tiny-flamingo"
    save_pretrained(tiny_model(tokenizer_dir), directory)
    return directory


def test_two_processes_evaluate_each_example_once_and_agree_with_one(checkpoint, tmp_path):
    mp.spawn(worker, args=(2, free_port(), checkpoint, tmp_path / "two"), nprocs=2, join=True)
    evaluate(checkpoint, tmp_path / "one")
    for task in TASKS:
        name = f"samples_{task}_1shot_trial0.jsonl"
        two, one = records(tmp_path / "two" / task / name), records(tmp_path / "one" / task / name)
        assert len(two) == 5 and len({str(r["doc_id"]) for r in two}) == 5  # 3 + 2 examples, none repeated
        assert [r["doc_id"] for r in two] == [r["doc_id"] for r in one]
        assert [r["demo_ids"] for r in two] == [r["demo_ids"] for r in one]
        assert [r["prediction"] for r in two] == [r["prediction"] for r in one]
        for a, b in zip(two, one, strict=True):
            assert a["score"] == pytest.approx(b["score"])
            for name_, value in (a.get("scores") or {}).items():
                assert value == pytest.approx(b["scores"][name_], abs=1e-5)
        results = json.loads((tmp_path / "two" / task / f"results_{task}.json").read_text())
        assert results["config"]["world_size"] == 2
