"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 reproduce the single-process run with the same global batch,
and an FSDP2 run resumes from its sharded checkpoint."""

from __future__ import annotations

import pytest
import torch
from helpers.train import (
    FINE_TUNED_LM,
    assert_same_weights,
    config_of,
    logged_losses,
    one_thread,  # noqa: F401 (an autouse fixture: tiny models run on one thread)
    tiny_run,
    torchrun,
)

from openflamingo.train import train
from openflamingo.train.config import to_toml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available"),
]


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
