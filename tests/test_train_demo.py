"""The demo's wiring: training on real tar shards through the "shards" loader, and evaluation after training."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.data import mixed_shards
from helpers.train import config_of, records, shard_run, tiny_run

from openflamingo import build_flamingo
from openflamingo.train import train
from openflamingo.train.config import EvaluateConfig, ExtraEvaluation
from openflamingo.train.evaluate import cross_attention_off, evaluate_after_training


def test_training_on_shards_resumes_with_exactly_the_same_batches(tokenizer_dir, tmp_path):
    mixed_shards(tmp_path / "shards")
    whole = tmp_path / "whole"
    train(config_of(shard_run(tokenizer_dir, tmp_path / "shards", whole)))
    split = tmp_path / "split"
    train(config_of(shard_run(tokenizer_dir, tmp_path / "shards", split, train={"steps": 2})))
    train(config_of(shard_run(tokenizer_dir, tmp_path / "shards", split)))  # resumes from step 2
    losses = {step: record["loss"] for step, record in records(whole).items()}
    assert len(losses) == 4
    assert {step: record["loss"] for step, record in records(split).items()} == losses


def test_evaluation_after_training_compares_with_and_without_images(tokenizer_dir, tmp_path, capsys):
    model = build_flamingo(config_of(tiny_run(tokenizer_dir, tmp_path)).model, seed=0)
    gates = [block.attn_gate.clone() for block in model.cross_attn_blocks.values()]
    with cross_attention_off(model):
        assert all(float(block.attn_gate.detach()) == 0 for block in model.cross_attn_blocks.values())
    assert all(
        torch.equal(a, block.attn_gate)
        for a, block in zip(gates, model.cross_attn_blocks.values(), strict=True)
    )

    config = EvaluateConfig(
        task="easy_vqa",
        shots=[0],
        num_samples=4,
        prompt="<image>Question: {question} Short answer: {answer}",
        separator="",
        batch_size=4,
        extra_tasks={"easy_vqa_binding": ExtraEvaluation(shots=[0, 2], num_samples=3)},
        blind_shots=[0],
    )
    summary = evaluate_after_training(model, config, tmp_path)
    assert set(summary) == {"trained", "blind"}
    for variant in summary.values():
        assert set(variant) == {"easy_vqa", "easy_vqa_binding"}
        scores = variant["easy_vqa"]["0-shot"]  # overall, then per answer type
        assert (
            "accuracy" in scores
            and set(scores) - {"accuracy"}
            and set(scores) <= {"accuracy", "yes/no", "shape", "color"}
        )
        assert set(variant["easy_vqa_binding"]["0-shot"]) == {"accuracy"}
    assert set(summary["trained"]["easy_vqa_binding"]) == {"0-shot", "2-shot"}
    assert set(summary["blind"]["easy_vqa_binding"]) == {"0-shot"}  # blind_shots
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == summary
    table = capsys.readouterr().out
    assert "| task | shots | answers | trained | blind |" in table
    assert "| easy_vqa_binding | 2 | all |" in table and table.count("| easy_vqa_binding | 2 | all |") == 1
    assert (tmp_path / "eval" / "trained" / "samples_easy_vqa_binding_2shot_trial0.jsonl").read_text().count(
        "\n"
    ) == 3
    # the binding prompts put the demonstrations' images in front of the query (2 shots: 3 images)
    record = json.loads(
        (tmp_path / "eval" / "trained" / "samples_easy_vqa_binding_2shot_trial0.jsonl").open().readline()
    )
    assert record["prompt"].count("<image>") == 3 == len(record["images"])
    assert record["prompt"].endswith("<image>This is a") and record["prediction"] in record["scores"]


def test_evaluation_tasks_are_checked_when_the_recipe_is_read():
    with pytest.raises(ValueError, match="evaluate.extra_tasks.easy_vqa_bind: unknown task"):
        EvaluateConfig(task="easy_vqa", extra_tasks={"easy_vqa_bind": ExtraEvaluation()})
    with pytest.raises(ValueError, match="evaluate.task: unknown task 'nope'"):
        EvaluateConfig(task="nope")
