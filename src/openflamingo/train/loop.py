"""The training loop: build, parallelize, resume, then per optimizer step accumulate, clip, step, log, checkpoint.

Loss normalisation. A dataset's loss is its summed token cross-entropy divided by the number of loss tokens of that
dataset in the whole optimizer step (all micro-steps, all ranks), and the step's loss is the loss-weighted sum over
datasets. Averaging per-micro-batch means instead would weight tokens differently depending on how padding falls
across ranks and micro-steps; with global token normalisation, 2 processes x batch B, 1 process x batch 2B and
1 process x 2 micro-steps of B all compute the same loss and gradients.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..model.checkpoint import build_or_load
from ..model.flamingo import Flamingo
from ..model.inputs import to_device
from . import distributed
from .checkpoint import Checkpointer, export_final, restore_rng
from .config import RunConfig, TrainConfig, to_toml
from .data import build_loader
from .logger import MetricLogger
from .metrics import Throughput, count_flops, gate_values, peak_flops
from .optim import LRSchedule, build_optimizer
from .parallelize import autocast_dtype, gradient_sync, parallelize, unwrap
from .prefetch import DevicePrefetcher, prepare_batch


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
    model: torch.nn.Module, batch: dict[str, Any], scale, device: torch.device, amp: torch.dtype | None
) -> torch.Tensor:
    """One dataset's prepared micro-batch (`prefetch.prepare_batch`): forward, backward of `scale` * summed token
    loss; returns the (detached) sum. Logits are computed only where a label follows, a chunk at a time."""
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with autocast:
        loss_sum = model(**batch["inputs"], targets=batch["targets"], validate_inputs=False).loss_sum
    (loss_sum * scale).backward()
    return loss_sum.detach()


def measure_flops_per_token(
    model, flamingo: Flamingo, loader, device: torch.device, amp: torch.dtype | None
) -> float | None:
    """FLOPs per sequence position of one micro-step (forward + backward of every dataset), counted on a peeked batch
    outside the training steps: a dispatch mode around a real step may pick other kernels and change its bits, which
    would break exact resume. The loader is rewound, and gradients are dropped. A count that fails (an operator
    the counter does not know) gives None, never a failed run."""
    state = loader.state_dict()
    step = next(loader)
    loader.load_state_dict(state)
    batches = to_device({name: prepare_batch(flamingo, batch) for name, batch in step.items()}, device)
    positions = sum(batch["inputs"]["input_ids"].numel() for batch in batches.values())
    try:
        # Synchronised backward (the default), so FSDP/DDP hold no half-accumulated gradients afterwards.
        with count_flops() as counter:
            for batch in batches.values():
                forward_backward(model, batch, 1.0, device, amp)
    except Exception as error:  # noqa: BLE001 - MFU is a report, the run matters more
        warnings.warn(
            f"log.mfu: counting FLOPs failed ({type(error).__name__}: {error}); MFU not reported",
            stacklevel=2,
        )
        return None
    finally:
        for param in model.parameters():
            param.grad = None
    return counter.get_total_flops() / positions if positions else None


def train(config: RunConfig) -> TrainResult:
    with deterministic_algorithms(config.train):
        dist = distributed.setup(config.train.device)
        try:
            result = _train(config, dist)
        except BaseException as error:
            distributed.teardown(dist, finished=False)
            if isinstance(error, RuntimeError) and "does not have a deterministic implementation" in str(
                error
            ):
                op = str(error).split(" does not have", 1)[0].strip()
                raise ValueError(
                    f"train.deterministic: {op} has no deterministic implementation on this device; "
                    "set --train.deterministic false to run without the guarantee"
                ) from None
            raise
        distributed.teardown(dist)
    return result


@contextlib.contextmanager
def deterministic_algorithms(config: TrainConfig) -> Iterator[None]:
    """torch's deterministic algorithms for the run (restored afterwards: training is also a library call)."""
    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    enabled = config.deterministic if config.deterministic is not None else not on_gpu
    if enabled and on_gpu:
        # cuBLAS picks reduction orders per stream unless its workspace is fixed; read when cuBLAS starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.deterministic = previous[1]


def _train(config: RunConfig, dist: distributed.Distributed) -> TrainResult:
    tc, device = config.train, dist.device
    output_dir = Path(tc.output_dir)
    names = sorted(config.enabled_datasets())  # fixed order: reductions must line up across ranks

    # Same seed on every rank: identical initial weights (DDP/FSDP expect them), including backbones that are
    # randomly initialised from a config (build_flamingo seeds only the new parts).
    torch.manual_seed(tc.seed)
    model = build_or_load(config.model, seed=tc.seed).train()
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
    throughput = Throughput(peak_flops(device, config.log.peak_tflops), dist.world_size)
    amp = autocast_dtype(config, device)
    if config.log.mfu:
        throughput.flops_per_token = measure_flops_per_token(model, flamingo, loader, device, amp)
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

    # Nothing in a step waits for the device: losses, gradient norms and the non-finite checks stay device tensors
    # until the window reads them, in one transfer per log interval (and at checkpoints).
    weights = torch.tensor(
        [config.datasets[n].loss_weight for n in names], dtype=torch.float64, device=device
    )
    max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf
    prefetcher = DevicePrefetcher(loader, device, partial(prepare_batch, flamingo))
    window = StepWindow(config, names, prefetcher, throughput, log, dist, counters["nonfinite_in_row"])
    try:
        while step < tc.steps:
            micro_batches = [next(prefetcher) for _ in range(tc.grad_accum)]

            # Loss tokens per dataset over the whole step and all ranks: each dataset's loss denominator.
            token_counts = torch.zeros(len(names), dtype=torch.float64, device=device)
            for mb in micro_batches:
                for name, batch in mb.items():
                    token_counts[names.index(name)] += batch["loss_tokens"]
                    window.local_tokens += batch["tokens"]
            distributed.all_reduce_sum(token_counts)
            denominators = token_counts.clamp(min=1)  # a dataset without loss tokens this step adds 0

            lr = schedule.apply(optimizer)
            loss_sums = torch.zeros(len(names), dtype=torch.float64, device=device)
            work = [(name, batch) for mb in micro_batches for name, batch in mb.items()]
            for i, (name, batch) in enumerate(work):
                k = names.index(name)
                # DDP/FSDP average gradients over ranks; scale by world size so they sum instead.
                scale = (weights[k] * dist.world_size / denominators[k]).float()
                with gradient_sync(model, enabled=i == len(work) - 1):
                    loss_sums[k] += forward_backward(model, batch, scale, device, amp)

            distributed.all_reduce_sum(loss_sums)
            dataset_loss = loss_sums / denominators
            loss = (weights * dataset_loss).sum()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            nonfinite = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
            optimizer.found_inf = (
                nonfinite  # the fused AdamW skips the whole update (and its step count) at 1
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.advance()
            step += 1
            window.add(step, lr, loss, grad_norm, dataset_loss, token_counts, nonfinite)
            log.progress(1)

            every = config.checkpoint.every
            log_now = step % config.log.every == 0 or step == tc.steps
            checkpoint_now = (every and step % every == 0) or step == tc.steps
            if log_now or checkpoint_now:
                window.flush(counters, result, model if log_now else None)
                counters.update(step=step, schedule=schedule.state_dict())
            if checkpoint_now:
                rank_state = {"loader": prefetcher.state_dict()}
                checkpointer.save(step, model, optimizer, dict(counters), rank_state)
    finally:
        prefetcher.close()

    if config.checkpoint.export:
        result.export_dir = export_final(model, config, output_dir / "final", dist)
        log.write(f"exported the trained model to {result.export_dir}")
    log.close()
    result.step = step
    result.skipped_steps = counters["skipped_steps"]
    return result


class StepWindow:
    """The optimizer steps since the device values were last read: their losses, gradient norms and non-finite
    flags (device tensors), wall time, time blocked on data, and this rank's tokens."""

    def __init__(
        self,
        config: RunConfig,
        names: list[str],
        prefetcher,
        throughput: Throughput,
        log,
        dist,
        nonfinite_in_row: int,
    ):
        self.config, self.names, self.prefetcher = config, names, prefetcher
        self.throughput, self.log = throughput, log
        self.nonfinite_in_row = torch.full((1,), float(nonfinite_in_row), device=dist.device)
        self._reset()

    def _reset(self) -> None:
        self.started = time.perf_counter()
        self.wait_at_start = self.prefetcher.wait_seconds
        self.local_tokens = 0.0
        self.steps: list[tuple[int, float, torch.Tensor]] = []

    def add(self, step, lr, loss, grad_norm, dataset_loss, token_counts, nonfinite) -> None:
        self.nonfinite_in_row = (self.nonfinite_in_row + nonfinite) * nonfinite
        values = [
            loss.reshape(1),
            grad_norm.double().reshape(1),
            nonfinite.double().reshape(1),
            dataset_loss,
            token_counts,
        ]
        self.steps.append((step, lr, torch.cat(values)))

    def flush(self, counters: dict, result: TrainResult, model: torch.nn.Module | None) -> None:
        """Read the window's values in one transfer, update `counters` and `result.losses`, report skipped steps,
        log the last step's record when `model` is given (a collective under FSDP: gate values), and stop the run
        after too many non-finite steps in a row."""
        rows = torch.stack(
            [torch.cat([v, self.nonfinite_in_row.double()]) for _, _, v in self.steps]
        ).tolist()
        tokens = torch.tensor([self.local_tokens], dtype=torch.float64)
        distributed.all_reduce_sum(tokens)
        seconds = time.perf_counter() - self.started
        n = len(self.names)
        for (step, _, _), (loss, grad_norm, nonfinite, *_) in zip(self.steps, rows, strict=True):
            result.losses[step] = loss
            if nonfinite:
                self.log.write(f"step {step}: non-finite loss {loss} / grad norm {grad_norm}; step skipped")
        counters["skipped_steps"] += sum(int(row[2]) for row in rows)
        counters["nonfinite_in_row"] = int(rows[-1][-1])
        counters["tokens_seen"] += int(tokens[0])
        step, lr, _ = self.steps[-1]
        loss, grad_norm = rows[-1][:2]
        self.log.progress(0, {"loss": f"{loss:.4f}"})
        if model is not None:
            data_seconds = self.prefetcher.wait_seconds - self.wait_at_start
            record = {
                "loss": loss,
                "dataset_loss": {
                    name: rows[-1][3 + i] for i, name in enumerate(self.names) if rows[-1][3 + n + i] > 0
                },
                "lr": lr,
                "grad_norm": grad_norm,
                **self.throughput.summary(float(tokens[0]), seconds, data_seconds, len(self.steps)),
                "tokens_seen": counters["tokens_seen"],
                "skipped_steps": counters["skipped_steps"],
                "gates": gate_values(model),
            }
            self.log.log(step, record)
        limit = self.config.train.max_nonfinite_in_row
        if counters["nonfinite_in_row"] >= max(1, limit):
            self.log.close()
            raise NonFiniteLossError(
                f"{counters['nonfinite_in_row']} steps in a row had a non-finite loss or gradient norm (last at "
                f"step {step}; train.max_nonfinite_in_row={limit}); lower train.lr or check the data"
            )
        self._reset()
