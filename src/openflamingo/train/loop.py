"""The training loop: build, parallelize, resume, then per optimizer step accumulate, clip, step, log, checkpoint.

Loss normalisation. A dataset's loss is its summed token cross-entropy divided by the number of loss tokens of that
dataset in the whole optimizer step (all micro-steps, all ranks), and the step's loss is the loss-weighted sum over
datasets. Averaging per-micro-batch means instead would weight tokens differently depending on how padding falls
across ranks and micro-steps; with global token normalisation, 2 processes x batch B, 1 process x batch 2B and
1 process x 2 micro-steps of B all compute the same loss and gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..model.build import build_flamingo
from ..model.flamingo import Flamingo, next_token_targets
from . import distributed
from .checkpoint import Checkpointer, export_final, restore_rng
from .config import RunConfig, to_toml
from .data import build_loader
from .logger import MetricLogger
from .metrics import Throughput, count_flops, gate_values, peak_flops
from .optim import LRSchedule, build_optimizer
from .parallelize import autocast_dtype, gradient_sync, parallelize, unwrap


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient norm."""


@dataclass
class TrainResult:
    model: Flamingo
    losses: dict[int, float] = field(
        default_factory=dict
    )  # step (1-based) -> loss, steps run by this call only
    step: int = 0
    skipped_steps: int = 0
    export_dir: Path | None = None
    resumed_from: Path | None = None


def forward_backward(
    model: torch.nn.Module, batch: dict[str, Any], scale: float, device: torch.device, amp: torch.dtype | None
) -> torch.Tensor:
    """One dataset's micro-batch: forward, backward of `scale` * summed token loss; returns the (detached) sum.
    Logits are computed only where a label follows."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    positions, targets = next_token_targets(batch["labels"], batch.get("document_ids"))
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(**inputs, logits_at=positions).logits
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    (loss_sum * scale).backward()
    return loss_sum.detach()


def measure_flops_per_token(model, loader, device: torch.device, amp: torch.dtype | None) -> float | None:
    """FLOPs per sequence position of one micro-step (forward + backward of every dataset), counted on a peeked batch
    outside the training steps: a dispatch mode around a real step may pick other kernels and change its bits, which
    would break exact resume. The loader is rewound, and gradients are dropped."""
    state = loader.state_dict()
    batches = _to_device(next(loader), device)
    loader.load_state_dict(state)
    positions = 0
    # Synchronised backward (the default), so FSDP/DDP hold no half-accumulated gradients afterwards.
    with count_flops() as counter:
        for batch in batches.values():
            forward_backward(model, batch, 1.0, device, amp)
            positions += batch["input_ids"].numel()
    for param in model.parameters():
        param.grad = None
    return counter.get_total_flops() / positions if positions else None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def train(config: RunConfig) -> TrainResult:
    dist = distributed.setup(config.train.device)
    try:
        result = _train(config, dist)
    except BaseException:
        distributed.teardown(dist, finished=False)
        raise
    distributed.teardown(dist)
    return result


def _train(config: RunConfig, dist: distributed.Distributed) -> TrainResult:
    tc = config.train
    output_dir = Path(tc.output_dir)
    names = sorted(config.enabled_datasets())  # fixed order: reductions must line up across ranks
    weights = {n: config.datasets[n].loss_weight for n in names}

    # Same seed on every rank: identical initial weights (DDP/FSDP expect them), including backbones that are
    # randomly initialised from a config (build_flamingo seeds only the new parts).
    torch.manual_seed(tc.seed)
    model = build_flamingo(config.model, seed=tc.seed).train()
    model = parallelize(model, config, dist)
    flamingo = unwrap(model)
    optimizer = build_optimizer(flamingo, tc)
    schedule = LRSchedule(tc)
    loader = build_loader(
        config.enabled_datasets(),
        config.data,
        flamingo,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=tc.seed if config.data.seed is None else config.data.seed,
    )
    throughput = Throughput(peak_flops(dist.device, config.log.peak_tflops), dist.world_size)
    amp = autocast_dtype(config, dist.device)
    if config.log.mfu:
        throughput.flops_per_token = measure_flops_per_token(model, loader, dist.device, amp)
    torch.manual_seed(tc.seed + 1_000_003 * dist.rank)  # runtime randomness differs per rank, reproducibly

    checkpointer = Checkpointer(output_dir / "checkpoints", config.checkpoint.keep, dist)
    counters = {
        "step": 0,
        "skipped_steps": 0,
        "nonfinite_in_row": 0,
        "tokens_seen": 0,
        "schedule": schedule.state_dict(),
    }
    resume_path = checkpointer.resolve(config.checkpoint.resume)
    if resume_path is not None:
        counters, rank_state = checkpointer.load(resume_path, model, optimizer, dict(counters))
        loader.load_state_dict(rank_state["loader"])
        restore_rng(rank_state["rng"])
        schedule.load_state_dict(counters["schedule"])
    step = counters["step"]

    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.toml").write_text(to_toml(config.to_dict()))
    log = MetricLogger(config.log, output_dir, tc.steps, step, dist.is_main, config.to_dict())
    if resume_path is not None:
        log.write(f"resumed from {resume_path} at step {step}")
    params = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult(model=flamingo, resumed_from=resume_path)

    while step < tc.steps:
        started = time.perf_counter()
        micro_batches = [_to_device(next(loader), dist.device) for _ in range(tc.grad_accum)]
        data_seconds = time.perf_counter() - started

        # Loss tokens per dataset over the whole step and all ranks, then the tokens processed.
        stats = torch.zeros(len(names) + 1, dtype=torch.float64)
        for mb in micro_batches:
            for name, batch in mb.items():
                stats[names.index(name)] += len(
                    next_token_targets(batch["labels"], batch.get("document_ids"))[1]
                )
                stats[-1] += (
                    int(batch["attention_mask"].sum())
                    if "attention_mask" in batch
                    else batch["input_ids"].numel()
                )
        distributed.all_reduce_sum(stats)
        token_counts, step_tokens = stats[:-1], int(stats[-1])

        lr = schedule.apply(optimizer)
        loss_sums = torch.zeros(len(names), dtype=torch.float64)
        work = [
            (name, batch)
            for mb in micro_batches
            for name, batch in mb.items()
            if token_counts[names.index(name)] > 0
        ]
        for i, (name, batch) in enumerate(work):
            with gradient_sync(model, enabled=i == len(work) - 1):
                # DDP/FSDP average gradients over ranks; scale by world size so they sum instead.
                scale = weights[name] * dist.world_size / float(token_counts[names.index(name)])
                loss_sum = forward_backward(model, batch, scale, dist.device, amp)
            loss_sums[names.index(name)] += float(loss_sum)

        distributed.all_reduce_sum(loss_sums)
        dataset_loss = {
            n: float(loss_sums[i] / token_counts[i]) for i, n in enumerate(names) if token_counts[i] > 0
        }
        loss = sum(weights[n] * v for n, v in dataset_loss.items())
        max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)

        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
            counters["nonfinite_in_row"] = 0
        else:
            counters["skipped_steps"] += 1
            counters["nonfinite_in_row"] += 1
            log.write(f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}; step skipped")
            if counters["nonfinite_in_row"] >= max(1, tc.max_nonfinite_in_row):
                log.close()
                raise NonFiniteLossError(
                    f"{counters['nonfinite_in_row']} steps in a row had a non-finite loss or gradient norm (last at "
                    f"step {step + 1}; train.max_nonfinite_in_row={tc.max_nonfinite_in_row}); lower train.lr or check the data"
                )
        optimizer.zero_grad(set_to_none=True)
        schedule.advance()
        step += 1
        counters.update(step=step, schedule=schedule.state_dict())
        counters["tokens_seen"] += step_tokens
        result.losses[step] = loss

        seconds = time.perf_counter() - started
        speed = throughput.summary(step_tokens, seconds, data_seconds)
        if step % config.log.every == 0 or step == tc.steps:
            record = {
                "loss": loss,
                "dataset_loss": dataset_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                **speed,
                "tokens_seen": counters["tokens_seen"],
                "skipped_steps": counters["skipped_steps"],
                "gates": gate_values(model),
            }
            log.log(step, record)
        log.progress(1, {"loss": f"{loss:.4f}", "tok/s": f"{speed['tokens_per_s']:.0f}"})

        every = config.checkpoint.every
        if (every and step % every == 0) or step == tc.steps:
            rank_state = {"loader": loader.state_dict()}
            checkpointer.save(step, model, optimizer, dict(counters), rank_state)

    if config.checkpoint.export:
        result.export_dir = export_final(model, config, output_dir / "final", dist)
        log.write(f"exported the trained model to {result.export_dir}")
    log.close()
    result.step = step
    result.skipped_steps = counters["skipped_steps"]
    return result
