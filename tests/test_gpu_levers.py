"""GPU levers checked on CPUs: parallel.mode = "fsdp" on one process is FSDP2 with its mixed precision (not a silent
"none"), parallel.compile = "auto" compiles on CUDA only, and bench/gpu/ours.py times the shipped step."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.train import config_of, one_thread, tiny_run, trainable_state  # noqa: F401  (one_thread: autouse)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from openflamingo import load
from openflamingo.model.checkpoint import build_or_load
from openflamingo.model.inputs import to_device
from openflamingo.train import distributed, train
from openflamingo.train.config import run_config
from openflamingo.train.data import build_loader
from openflamingo.train.loop import forward_backward
from openflamingo.train.parallelize import (
    compile_enabled,
    decoder_layers,
    gradient_sync,
    parallel_mode,
    parallelize,
)
from openflamingo.train.prefetch import prepare_batch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed not available"
)
REPO = Path(__file__).resolve().parents[1]
FSDP = {"mode": "fsdp"}


@pytest.fixture(scope="module")
def runs(tokenizer_dir, tmp_path_factory):
    """4 steps of 2 micro-steps over 2 datasets (fp32 everywhere, the CPU default), mode none and one-process fsdp."""
    root = tmp_path_factory.mktemp("levers")
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, parallel in (("none", {"mode": "none"}), ("fsdp", FSDP)):
        run = tiny_run(tokenizer_dir, root / name, train={"grad_accum": 2}, parallel=parallel)
        results[name] = (run, train(config_of(run)))
    torch.set_num_threads(threads)
    return results


def test_fsdp_on_one_process_wraps_with_fully_shard_and_trains_as_mode_none(runs):
    (_, plain), (_, sharded) = runs["none"], runs["fsdp"]
    model = sharded.model
    assert isinstance(model, FSDPModule) and not isinstance(plain.model, FSDPModule)
    assert all(isinstance(layer, FSDPModule) for layer in decoder_layers(model))
    assert isinstance(model.perceiver, FSDPModule)
    assert sharded.losses == pytest.approx(plain.losses, rel=1e-6)
    assert not torch.distributed.is_initialized()  # the run's one-process group ends with the run
    exported = load(Path(runs["fsdp"][0]["train"]["output_dir"]) / "final")
    for name, value in trainable_state(plain.model).items():
        torch.testing.assert_close(exported.get_parameter(name), value, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_on_one_process_resumes_from_its_checkpoint_exactly(runs, tmp_path):
    run, full = runs["fsdp"]
    run = {**run, "train": {**run["train"], "output_dir": str(tmp_path)}}
    first = train(config_of({**run, "train": {**run["train"], "steps": 2}}))
    assert len(list((tmp_path / "checkpoints" / "step_00000002").glob("*.distcp"))) == 1
    resumed = train(config_of(run))
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step_00000002"
    assert {**first.losses, **resumed.losses} == full.losses  # bitwise
    for name, value in trainable_state(full.model).items():
        # One process: a parameter's local shard is all of it (and the run's process group is gone).
        assert torch.equal(resumed.model.get_parameter(name).to_local(), value.to_local()), name


def test_fsdp_on_one_process_computes_in_bf16_keeps_fp32_weights_and_casts_once_per_step(
    tokenizer_dir, tmp_path
):
    config = config_of(tiny_run(tokenizer_dir, tmp_path, precision={"autocast": "bf16"}, parallel=FSDP))
    dist = distributed.Distributed()
    torch.manual_seed(0)
    model = parallelize(build_or_load(config.model, seed=0).train(), config, dist)
    try:
        assert parallel_mode(config, dist) == "fsdp" and isinstance(model, FSDPModule)
        block = next(iter(model.cross_attn_blocks.values()))
        linear = next(m for m in block.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad)
        seen, after_forward = [], []
        linear.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
        model.register_forward_hook(lambda *_: after_forward.append(isinstance(linear.weight, DTensor)))
        loader = build_loader(config.enabled_datasets(), config.data, model, rank=0, world_size=1, seed=0)
        micro_steps = [
            to_device(
                {name: prepare_batch(model, batch) for name, batch in next(loader).items()}, dist.device
            )
            for _ in range(2)
        ]
        work = [batch for step in micro_steps for batch in step.values()]
        before = trainable_state(model)
        losses = []
        for i, batch in enumerate(work):
            with gradient_sync(model, enabled=i == len(work) - 1):
                losses.append(forward_backward(model, batch, 1.0 / len(work), dist.device, torch.bfloat16))
            # The compute copies stay (plain tensors, unsharded) until the step's last backward frees them.
            assert isinstance(linear.weight, DTensor) == (i == len(work) - 1)
        assert seen == [torch.bfloat16] * len(work)
        # Not resharded after forward either: no second cast for the backward.
        assert after_forward == [False] * len(work)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for _, p in trainable)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in trainable)
        torch.optim.AdamW([p for _, p in trainable], lr=1e-2).step()
        assert all(torch.isfinite(loss) for loss in losses)
        changed = [n for n, p in trainable if not torch.equal(p.full_tensor(), before[n].full_tensor())]
        assert changed and all(p.dtype == torch.float32 for _, p in trainable)
    finally:
        distributed.teardown(dist)
    assert not torch.distributed.is_initialized()


def test_fsdp_on_one_process_trains_with_bf16_compute(tokenizer_dir, tmp_path):
    run = tiny_run(tokenizer_dir, tmp_path, precision={"autocast": "bf16"}, parallel=FSDP)
    run["train"].update(steps=3)
    run["checkpoint"].update(export=False)
    torch.manual_seed(0)
    start = trainable_state(build_or_load(config_of(run).model, seed=0))
    result = train(config_of(run))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    params = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in params.values())  # master weights
    assert any(not torch.equal(p.to_local(), start[n]) for n, p in params.items())


def test_ddp_on_one_process_trains_unwrapped_and_says_so(tokenizer_dir, tmp_path, caplog):
    config = config_of(tiny_run(tokenizer_dir, tmp_path, parallel={"mode": "ddp"}))
    model = build_or_load(config.model, seed=0)
    with caplog.at_level(logging.INFO, logger="openflamingo"):
        assert parallelize(model, config, distributed.Distributed()) is model
    assert "'ddp' on one process trains the model unwrapped" in caplog.text
    assert not torch.distributed.is_initialized()


def test_compile_auto_is_on_for_cuda_only(tokenizer_dir, tmp_path):
    def parallel(**values):
        return config_of(tiny_run(tokenizer_dir, tmp_path, parallel=values))

    auto = parallel()
    assert auto.parallel.compile == "auto"
    assert compile_enabled(auto, torch.device("cuda", 0)) is True
    assert compile_enabled(auto, torch.device("cpu")) is False
    for choice in (True, False):
        for device in ("cpu", "cuda"):
            assert compile_enabled(parallel(compile=choice), torch.device(device)) is choice
    model = parallelize(build_or_load(auto.model, seed=0), auto, distributed.Distributed())
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in decoder_layers(model))


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_takes_auto_true_or_false_only(tokenizer_dir, tmp_path, value):
    run = tiny_run(tokenizer_dir, tmp_path, parallel={"compile": value})
    with pytest.raises(ValueError, match=r'^parallel\.compile: expected "auto", true or false, got '):
        run_config(run)


def test_bench_ours_times_the_shipped_step_on_a_cpu(tmp_path):
    jsonl = tmp_path / "bench.jsonl"
    command = [sys.executable, str(REPO / "bench" / "gpu" / "ours.py"), "--smoke", "--device", "cpu"]
    command += ["--assets", str(tmp_path / "assets"), "--jsonl", str(jsonl)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    (step,) = [r for r in records if r["what"] == "train_step"]
    assert step["impl"] == "ours" and step["variant"] == "default" and step["mode"] == "none"
    assert step["compile"] is False and len(step["times"]) == 1 and step["tokens_per_s"] > 0
    assert step["flops_per_step"] > 0
    assert not [r for r in records if r["what"] == "error"]
