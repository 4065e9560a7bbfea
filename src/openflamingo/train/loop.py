"""The training loop: build, parallelize, resume, then per optimizer step accumulate, clip, step, log, checkpoint.

Loss normalisation. A dataset's loss is its summed token cross-entropy divided by the number of loss tokens of that
dataset in the whole optimizer step (all micro-steps, all ranks), and the step's loss is the loss-weighted sum over
datasets. Averaging per-micro-batch means instead would weight tokens differently depending on how padding falls
across ranks and micro-steps; with global token normalisation, 2 processes x batch B, 1 process x batch 2B and
1 process x 2 micro-steps of B all compute the same loss and gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from ..errors import InputError, OpenFlamingoError
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


class NonFiniteLossError(OpenFlamingoError, RuntimeError):
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


def resume_elsewhere(
    loader, states: list[dict[str, Any]], config: RunConfig, dist: distributed.Distributed
) -> None:
    """Continue the data order of a checkpoint written by another number of processes: the loader takes the merge
    of every saved process's state (runtime randomness, e.g. dropout, is seeded afresh per rank and step)."""
    merge = getattr(loader, "merge_state_dicts", None)
    if merge is None:
        raise InputError(
            f"data.loader {config.data.loader!r} keeps its position per process and has no merge_state_dicts, so "
            f"the run cannot move from {len(states)} to {dist.world_size} processes; resume on {len(states)}"
        )
    loader.load_state_dict(merge(states))


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
                raise InputError(
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


@dataclass
class TrainState:
    """What the run carries from one optimizer step to the next; `state_dict()` is the checkpoint's "train" entry."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    skipped_steps: int = 0  # steps whose loss or gradient norm was not finite (no update)
    nonfinite_in_row: int = 0
    tokens_seen: int = 0  # sequence positions, all ranks
    schedule: dict[str, Any] = field(default_factory=dict)  # LRSchedule.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.state_dict():
            setattr(self, name, state[name])


@dataclass
class StepStats:
    """One optimizer step's results. The tensors stay on the device until a `StepWindow` reads them."""

    step: int
    lr: float
    loss: torch.Tensor  # () loss-weighted sum over datasets
    grad_norm: torch.Tensor  # () before clipping
    nonfinite: torch.Tensor  # () 1.0 when the loss or gradient norm was not finite: the update was skipped
    dataset_loss: torch.Tensor  # (datasets,) in `Trainer.names` order
    loss_tokens: torch.Tensor  # (datasets,) loss tokens of the step, all ranks
    local_tokens: float  # sequence positions of this rank's micro-batches


@dataclass
class WindowRecord:
    """What a `StepWindow` read: per-step losses, the skipped steps, and the last step's metrics."""

    losses: dict[int, float]  # step -> loss
    skipped: list[tuple[int, float, float]]  # (step, loss, grad norm) of steps with a non-finite value
    nonfinite_in_row: int  # after the window's last step
    tokens: int  # sequence positions of the window's steps, all ranks
    metrics: dict[str, Any]  # the last step's record: loss, dataset_loss, lr, grad_norm, throughput


@dataclass
class Trainer:
    """The parts of a run that a training step uses, built once by `setup`."""

    config: RunConfig
    dist: distributed.Distributed
    model: torch.nn.Module  # wrapped for DDP/FSDP where the run is distributed
    flamingo: Flamingo  # the same model unwrapped
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    loader: Any
    names: list[str]  # enabled datasets in a fixed order: reductions must line up across ranks
    amp: torch.dtype | None
    throughput: Throughput
    loss_weights: torch.Tensor  # (datasets,) on the device, in `names` order
    params: list[torch.nn.Parameter]  # the trainable ones, clipped together

    def train_step(self, micro_batches: list[dict[str, dict[str, Any]]]) -> StepStats:
        """One optimizer step over `micro_batches` (per dataset, prepared and on the device): accumulate, clip,
        step. Nothing in it waits for the device."""
        device, dist, weights = self.dist.device, self.dist, self.loss_weights
        # Loss tokens per dataset over the whole step and all ranks: each dataset's loss denominator.
        loss_tokens = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        local_tokens = 0.0
        for mb in micro_batches:
            for name, batch in mb.items():
                loss_tokens[self.names.index(name)] += batch["loss_tokens"]
                local_tokens += batch["tokens"]
        distributed.all_reduce_sum(loss_tokens)
        denominators = loss_tokens.clamp(min=1)  # a dataset without loss tokens this step adds 0

        lr = self.schedule.apply(self.optimizer)
        loss_sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        work = [(name, batch) for mb in micro_batches for name, batch in mb.items()]
        for i, (name, batch) in enumerate(work):
            k = self.names.index(name)
            # DDP/FSDP average gradients over ranks; scale by world size so they sum instead.
            scale = (weights[k] * dist.world_size / denominators[k]).float()
            with gradient_sync(self.model, enabled=i == len(work) - 1):
                loss_sums[k] += forward_backward(self.model, batch, scale, device, self.amp)

        distributed.all_reduce_sum(loss_sums)
        dataset_loss = loss_sums / denominators
        loss = (weights * dataset_loss).sum()
        max_norm = self.config.train.max_grad_norm if self.config.train.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        nonfinite = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        self.optimizer.found_inf = (
            nonfinite  # the fused AdamW skips the whole update (and its step count) at 1
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.advance()
        return StepStats(
            self.schedule.step, lr, loss, grad_norm, nonfinite, dataset_loss, loss_tokens, local_tokens
        )


def setup(config: RunConfig, dist: distributed.Distributed) -> Trainer:
    """Build (or load) the model, parallelize it, and make its optimizer, schedule and data loader."""
    tc = config.train
    # Same seed on every rank: identical initial weights (DDP/FSDP expect them), including backbones that are
    # randomly initialised from a config (build_flamingo seeds only the new parts).
    torch.manual_seed(tc.seed)
    model = build_or_load(config.model, seed=tc.seed).train()
    model = parallelize(model, config, dist)
    flamingo = unwrap(model)
    optimizer = build_optimizer(flamingo, tc)
    names = sorted(config.enabled_datasets())
    loader = build_loader(
        config.enabled_datasets(),
        config.data,
        flamingo,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=tc.seed if config.data.seed is None else config.data.seed,
    )
    trainer = Trainer(
        config=config,
        dist=dist,
        model=model,
        flamingo=flamingo,
        optimizer=optimizer,
        schedule=LRSchedule(tc),
        loader=loader,
        names=names,
        amp=autocast_dtype(config, dist.device),
        throughput=Throughput(peak_flops(dist.device, config.log.peak_tflops), dist.world_size),
        loss_weights=torch.tensor(
            [config.datasets[n].loss_weight for n in names], dtype=torch.float64, device=dist.device
        ),
        params=[p for p in model.parameters() if p.requires_grad],
    )
    if config.log.mfu:
        trainer.throughput.flops_per_token = measure_flops_per_token(
            model, flamingo, loader, dist.device, trainer.amp
        )
    return trainer


def _train(config: RunConfig, dist: distributed.Distributed) -> TrainResult:
    tc = config.train
    output_dir = Path(tc.output_dir)
    trainer = setup(config, dist)
    model, optimizer, schedule = trainer.model, trainer.optimizer, trainer.schedule
    torch.manual_seed(tc.seed + 1_000_003 * dist.rank)  # runtime randomness differs per rank, reproducibly

    checkpointer = Checkpointer(output_dir / "checkpoints", config.checkpoint.keep, dist)
    state = TrainState(schedule=schedule.state_dict())
    resume_path = checkpointer.resolve(config.checkpoint.resume)
    if resume_path is not None:
        saved, rank_states, saved_world_size = checkpointer.load(
            resume_path, model, optimizer, state.state_dict()
        )
        state.load_state_dict(saved)
        if saved_world_size == dist.world_size:
            trainer.loader.load_state_dict(rank_states[dist.rank]["loader"])
            restore_rng(rank_states[dist.rank]["rng"])
        else:
            resume_elsewhere(
                trainer.loader, [s["loader"] for _, s in sorted(rank_states.items())], config, dist
            )
            torch.manual_seed(tc.seed + 1_000_003 * dist.rank + state.step)
        schedule.load_state_dict(state.schedule)

    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.toml").write_text(to_toml(config.to_dict()))
    log = MetricLogger(config.log, output_dir, tc.steps, state.step, dist.is_main, config.to_dict())
    if resume_path is not None:
        moved = "" if saved_world_size == dist.world_size else f" (written by {saved_world_size} processes)"
        log.write(f"resumed from {resume_path} at step {state.step} on {dist.world_size} processes{moved}")
    result = TrainResult(model=trainer.flamingo, resumed_from=resume_path)

    # Losses, gradient norms and the non-finite checks stay device tensors until the window reads them, in one
    # transfer per log interval (and at checkpoints).
    prefetcher = DevicePrefetcher(trainer.loader, dist.device, partial(prepare_batch, trainer.flamingo))
    window = StepWindow(trainer.names, prefetcher, trainer.throughput, dist.device, state.nonfinite_in_row)
    try:
        while state.step < tc.steps:
            window.add(trainer.train_step([next(prefetcher) for _ in range(tc.grad_accum)]))
            state.step = schedule.step
            log.progress(1)

            every = config.checkpoint.every
            log_now = state.step % config.log.every == 0 or state.step == tc.steps
            checkpoint_now = (every and state.step % every == 0) or state.step == tc.steps
            if log_now or checkpoint_now:
                record = window.flush()
                _account(state, record, result, log)
                # Gate values gather the blocks' parameters: a collective under FSDP, so every rank asks.
                gates = gate_values(model) if log_now else None
                if gates is not None:
                    extra = {"tokens_seen": state.tokens_seen, "skipped_steps": state.skipped_steps}
                    log.log(state.step, {**record.metrics, **extra, "gates": gates})
                limit = tc.max_nonfinite_in_row
                if state.nonfinite_in_row >= max(1, limit):
                    log.close()
                    raise NonFiniteLossError(
                        f"{state.nonfinite_in_row} steps in a row had a non-finite loss or gradient norm (last at "
                        f"step {state.step}; train.max_nonfinite_in_row={limit}); lower train.lr or check the data"
                    )
                state.schedule = schedule.state_dict()
            if checkpoint_now:
                rank_state = {"loader": prefetcher.state_dict()}
                checkpointer.save(state.step, model, optimizer, state.state_dict(), rank_state)
    finally:
        prefetcher.close()

    if config.checkpoint.export:
        result.export_dir = export_final(model, config, output_dir / "final", dist)
        log.write(f"exported the trained model to {result.export_dir}")
    log.close()
    result.step = state.step
    result.skipped_steps = state.skipped_steps
    return result


def _account(state: TrainState, record: WindowRecord, result: TrainResult, log: MetricLogger) -> None:
    """A window's record into the run's state, the result's losses and the console."""
    result.losses.update(record.losses)
    for step, loss, grad_norm in record.skipped:
        log.write(f"step {step}: non-finite loss {loss} / grad norm {grad_norm}; step skipped")
    state.skipped_steps += len(record.skipped)
    state.nonfinite_in_row = record.nonfinite_in_row
    state.tokens_seen += record.tokens
    log.progress(0, {"loss": f"{record.metrics['loss']:.4f}"})


class StepWindow:
    """The optimizer steps since the device values were last read (`add`), read in one transfer by `flush`, with
    the window's wall time, time blocked on data, and tokens."""

    def __init__(self, names: list[str], prefetcher, throughput: Throughput, device, nonfinite_in_row: int):
        self.names, self.prefetcher, self.throughput = names, prefetcher, throughput
        # Steps in a row with a non-finite value, counted on the device: (count + flag) * flag per step.
        self.nonfinite_in_row = torch.full((1,), float(nonfinite_in_row), device=device)
        self._reset()

    def _reset(self) -> None:
        self.started = time.perf_counter()
        self.wait_at_start = self.prefetcher.wait_seconds
        self.steps: list[StepStats] = []
        self.in_row: list[torch.Tensor] = []  # nonfinite_in_row after each step

    def add(self, stats: StepStats) -> None:
        self.nonfinite_in_row = (self.nonfinite_in_row + stats.nonfinite) * stats.nonfinite
        self.steps.append(stats)
        self.in_row.append(self.nonfinite_in_row)

    def flush(self) -> WindowRecord:
        """Read the window's values (one transfer, and one all-reduce of the token count) and start a new one."""
        n = len(self.names)
        rows = torch.stack(
            [
                torch.cat(
                    [
                        s.loss.double().reshape(1),
                        s.grad_norm.double().reshape(1),
                        s.nonfinite.double().reshape(1),
                        in_row.double(),
                        s.dataset_loss.double(),
                        s.loss_tokens.double(),
                    ]
                )
                for s, in_row in zip(self.steps, self.in_row, strict=True)
            ]
        ).tolist()
        tokens = torch.tensor([sum(s.local_tokens for s in self.steps)], dtype=torch.float64)
        distributed.all_reduce_sum(tokens)
        seconds = time.perf_counter() - self.started
        data_seconds = self.prefetcher.wait_seconds - self.wait_at_start
        values = [
            dict(zip(("loss", "grad_norm", "nonfinite", "in_row"), row[:4], strict=True)) for row in rows
        ]
        last, last_row = self.steps[-1], rows[-1]
        dataset_loss, loss_tokens = last_row[4 : 4 + n], last_row[4 + n : 4 + 2 * n]
        record = WindowRecord(
            losses={s.step: v["loss"] for s, v in zip(self.steps, values, strict=True)},
            skipped=[
                (s.step, v["loss"], v["grad_norm"])
                for s, v in zip(self.steps, values, strict=True)
                if v["nonfinite"]
            ],
            nonfinite_in_row=int(values[-1]["in_row"]),
            tokens=int(tokens[0]),
            metrics={
                "loss": values[-1]["loss"],
                "dataset_loss": {
                    name: dataset_loss[i] for i, name in enumerate(self.names) if loss_tokens[i] > 0
                },
                "lr": last.lr,
                "grad_norm": values[-1]["grad_norm"],
                **self.throughput.summary(float(tokens[0]), seconds, data_seconds, len(self.steps)),
            },
        )
        self._reset()
        return record
