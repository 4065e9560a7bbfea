"""Training builders: a tiny run config, the one-thread fixture, metrics.jsonl readers, and training in a child
process or under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_CLIP, lm_config
from transformers import AutoTokenizer

from openflamingo.train.config import RunConfig, run_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on shared cores spinning OpenMP threads cost a lot.

    Autouse in the test modules that import it by name (`from helpers.train import one_thread  # noqa: F401`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run(tokenizer_dir, output_dir, **sections) -> dict:
    """A whole run config as plain data: tiny llama + tiny CLIP, two synthetic datasets, small everything."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    run = {
        "model": {
            "language_model_config": lm_config("llama", tokenizer),
            "tokenizer": str(tokenizer_dir),
            "vision": {"kind": "hf_clip", "config": TINY_CLIP},
            "perceiver": {"depth": 1, "num_latents": 4, "heads": 2, "dim_head": 8},
            "cross_attention": {
                "every_n_layers": 2,
                "heads": 2,
                "dim_head": 8,
                "gate_init": 1.0,
                "zero_init_output": True,
            },
        },
        "datasets": {
            "pairs": {"batch_size": 4, "loss_weight": 0.2, "seq_len": 12},
            "docs": {"batch_size": 2, "seq_len": 24, "max_images": 3, "kind": "interleaved"},
        },
        "train": {"steps": 4, "lr": 3e-3, "warmup_steps": 2, "output_dir": str(output_dir)},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"progress": False, "peak_tflops": 1.0, "mfu": False},
    }
    for section, values in sections.items():
        run.setdefault(section, {}).update(values)
    return run


def shard_run(tokenizer_dir, shards_dir, output_dir, **sections) -> dict:
    run = tiny_run(tokenizer_dir, output_dir, data={"loader": "shards"}, **sections)
    for dataset in run["datasets"].values():
        dataset.update(path=str(shards_dir), options={"num_workers": 1, "shuffle_buffer": 8})
    return run


# LoRA adapters plus one fully trained decoder layer: what fine-tuning recipes train besides the Flamingo parts.
FINE_TUNED_LM = {
    "lora": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]},
    "train_language_model_layers": [1],
}


def config_of(run: dict) -> RunConfig:
    return run_config(run)


def records(output_dir) -> dict[int, dict]:
    """metrics.jsonl by step; after a resume the last record of a step wins."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def logged_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_weights(a: Path, b: Path) -> None:
    for file in ("model.safetensors", "adapter/adapter_model.safetensors"):
        ours, theirs = load_file(a / "final" / file), load_file(b / "final" / file)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


def kill_after_logged_steps(config_path: Path, metrics: Path, steps: int, timeout: float) -> None:
    """Train from `config_path` in a child process and SIGKILL it once `metrics` has `steps` records."""
    process = _launch(config_path)
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "training did not progress"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _launch(config_path: Path, **extra) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1", **extra)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import torch, sys; torch.set_num_threads(int(sys.argv[1]));"
            "from openflamingo.train.cli import main; sys.exit(main(['--config', sys.argv[2]]))",
            str(torch.get_num_threads()),
            str(config_path),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def torchrun(config_path: Path, *overrides: str, timeout: int = 240) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "openflamingo.train", "--config", str(config_path), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        done.stdout[-3000:]
        + "\n".join(line for line in done.stderr.splitlines() if "DEBUG" not in line)[-8000:]
    )
    return done.stderr
