"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 reproduce the single-process run with the same global batch,
and an FSDP2 run resumes from its sharded checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import FINE_TUNED_LM, config_of, one_thread, tiny_run  # noqa: F401  (one_thread: autouse)

from openflamingo.train import train
from openflamingo.train.config import to_toml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available"),
]


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


def logged_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def assert_same_weights(a: Path, b: Path) -> None:
    for file in ("model.safetensors", "adapter/adapter_model.safetensors"):
        ours, theirs = load_file(a / "final" / file), load_file(b / "final" / file)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def reference(tokenizer_dir, tmp_path_factory):
    """The single-process run: same global batch per dataset, 2 micro-steps per optimizer step. The LM is
    fine-tuned too (LoRA adapters and one fully trained layer), so frozen and trained tensors share FSDP units."""
    root = tmp_path_factory.mktemp("distributed")
    run = tiny_run(tokenizer_dir, root / "single", train={"grad_accum": 2})
    run["model"].update(FINE_TUNED_LM)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = train(config_of(run))
    torch.set_num_threads(threads)
    config_path = root / "run.toml"
    config_path.write_text(to_toml(run))
    return root, config_path, result.losses


def test_ddp_on_two_processes_matches_the_single_process_run(reference):
    root, config_path, losses = reference
    torchrun(config_path, "--parallel.mode", "ddp", "--train.output_dir", str(root / "ddp"))
    assert logged_losses(root / "ddp") == pytest.approx(losses, rel=1e-5)
    assert_same_weights(root / "ddp", root / "single")


def test_fsdp2_with_activation_checkpointing_matches_and_resumes_from_sharded_checkpoints(reference):
    root, config_path, losses = reference
    out = root / "fsdp"
    common = ["--parallel.mode", "fsdp", "--parallel.activation_checkpointing", "true"]
    torchrun(config_path, *common, "--train.output_dir", str(out), "--train.steps", "2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert len(list((out / "checkpoints" / "step_00000002").glob("*.distcp"))) == 2  # one shard file per rank
    log = torchrun(config_path, *common, "--train.output_dir", str(out))
    assert "resumed from" in log and "step_00000002" in log
    assert logged_losses(out) == pytest.approx(losses, rel=1e-5)
    assert_same_weights(out, root / "single")
