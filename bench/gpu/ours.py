#!/usr/bin/env python
"""Our side of bench/gpu.sh: the training step exactly as `openflamingo train` runs it, and generation.

    ours.py --assets DIR [--size of3b] [--variants default eager ...] --what train profile | gen | maxbatch
    ours.py --smoke [--device cpu] --assets DIR     one step of the tiny shape (made in DIR if missing); a CPU test

The step is the shipped one, not a copy: the model from `build_or_load`, made ready by `parallelize` (frozen
weights' dtype, torch.compile, FSDP2), the batch through `prefetch.prepare_batch`, then `loop.forward_backward`
(the summed token loss, logits only where a label follows, a chunk at a time) inside `gradient_sync`, global-norm
clipping and the project's `build_optimizer` AdamW with its on-device `found_inf` flag, as train/loop.py runs one
micro-batch of one dataset. The batch is fixed: 16 x 256 tokens x 6 images (of3b), no padding, OpenFlamingo's
label masking (common.make_batch), so the peer's step sees the same tokens.

Each variant is the run config's defaults with a few keys overridden, on a freshly built model:

    default            nothing overridden: on a GPU bf16 autocast, frozen weights bf16, parallel.compile "auto" (on)
    eager              parallel.compile = false
    eager-frozen-fp32  also precision.frozen_dtype = "fp32"
    fsdp               parallel.mode = "fsdp" on this one process (FSDP2's mixed precision, one-process group)

Per variant: warm-up time (compilation included), median step time, tokens/s, MFU (the loop's own FLOP counter,
counted once with compilation off: the same arithmetic either way; over 989 TFLOP/s), peak memory. `profile`
(first variant): per-phase times (forward, backward, clip, optimizer), the frozen vision tower alone, and
torch.profiler's top-10 kernels. `gen` (an eager model, bf16 on a GPU): 8 prompts x 1 image, 64 new tokens.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from assets import make_assets
from common import (
    SHAPES,
    Batch,
    Clock,
    Recorder,
    Shape,
    count_flops,
    device_name,
    gen_record,
    kernel_table,
    largest_batch,
    make_batch,
    package_version,
    param_counts,
    parser,
    peak_gb,
    prompt_batch,
    reset_peak,
    step_record,
    sync,
    timed,
    top_kernels,
)

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "eager": {"parallel.compile": False},
    "eager-frozen-fp32": {"parallel.compile": False, "precision.frozen_dtype": "fp32"},
    "fsdp": {"parallel.mode": "fsdp"},
}


def recipe(shape: Shape, assets: Path, device: str, overrides: dict[str, Any]):
    """The run config of a variant: the bench shape, the config's defaults, then `overrides` ("section.key")."""
    from openflamingo.train.config import run_config

    data: dict[str, Any] = {
        "model": {
            "language_model": str(assets / "lm"),
            "vision": {"kind": "hf_clip", "config": {**shape.vit, "hidden_act": "quick_gelu"}},
            "perceiver": {"depth": shape.perceiver_depth, "num_latents": shape.perceiver_latents},
            "cross_attention": {"every_n_layers": shape.every},
        },
        "datasets": {
            "bench": {
                "kind": "interleaved",
                "batch_size": shape.batch,
                "seq_len": shape.seq,
                "max_images": shape.images,
            }
        },
        "train": {"lr": 1e-4, "device": device},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    return run_config(data)


@dataclasses.dataclass
class Ready:
    """A model as the training loop holds it after start-up, with its optimizer."""

    model: torch.nn.Module  # what parallelize returned
    flamingo: Any
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    amp: torch.dtype | None
    labels: dict[str, Any]  # what the records say about the variant
    mark: Callable[[str], None] = lambda phase: None  # called when the model's forward returns


def build(config, dist, variant: str) -> Ready:
    """train/loop.py's start-up: same seed, build, parallelize, the optimizer over the unwrapped model."""
    from openflamingo.model.checkpoint import build_or_load
    from openflamingo.train.optim import build_optimizer
    from openflamingo.train.parallelize import (
        autocast_dtype,
        compile_enabled,
        frozen_dtype,
        parallel_mode,
        parallelize,
        unwrap,
    )

    torch.manual_seed(config.train.seed)
    model = build_or_load(config.model, seed=config.train.seed).train()
    labels = dict(
        variant=variant,
        frozen_dtype="bf16" if frozen_dtype(config, dist.device) == torch.bfloat16 else "fp32",
        autocast="bf16" if autocast_dtype(config, dist.device) == torch.bfloat16 else "fp32",
        compile=compile_enabled(config, dist.device),
        mode=parallel_mode(config, dist),
    )
    model = parallelize(model, config, dist)
    flamingo = unwrap(model)
    ready = Ready(
        model=model,
        flamingo=flamingo,
        optimizer=build_optimizer(flamingo, config.train),
        params=[p for p in model.parameters() if p.requires_grad],
        amp=autocast_dtype(config, dist.device),
        labels=labels,
    )
    flamingo.register_forward_hook(lambda *_: ready.mark("forward"))
    return ready


def make_step(ready: Ready, batch: Batch, dev: torch.device) -> Callable[..., None]:
    """One optimizer step of one micro-batch, as the loop runs it. The batch is prepared and moved once, as the
    loop's prefetch thread would have done ahead of the step. `step(mark)` calls `mark(phase)` as each ends."""
    from openflamingo.model.inputs import to_device
    from openflamingo.train.loop import forward_backward
    from openflamingo.train.parallelize import gradient_sync
    from openflamingo.train.prefetch import prepare_batch

    loader_batch = dict(
        input_ids=batch.ids, attention_mask=batch.attn, labels=batch.labels, images=batch.images
    )
    prepared = to_device(prepare_batch(ready.flamingo, loader_batch), dev)
    # The loop's scale for one dataset on one process: its loss is the token mean over the step.
    scale = (1.0 / prepared["loss_tokens"].clamp(min=1)).float()

    def step(mark: Callable[[str], None] = lambda phase: None) -> None:
        ready.mark = (
            mark  # "forward" comes from the hook; the loss's own chunked backward runs inside forward
        )
        with gradient_sync(ready.model, enabled=True):
            forward_backward(ready.model, prepared, scale, dev, ready.amp)
        mark("backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(ready.params, 1.0)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        ready.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        mark("clip")
        ready.optimizer.step()
        ready.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")

    return step


def step_flops(step: Callable[[], None]) -> float | None:
    """The loop's FLOP counter over one step with compilation off (the same matmuls; a dispatch mode around
    compiled code may fail or count nothing)."""
    from openflamingo.train.metrics import count_flops as loop_counter

    with torch.compiler.set_stance("force_eager"):
        return count_flops(step, loop_counter)


def run_ours(args, shape: Shape, dist, rec: Recorder) -> None:
    dev = dist.device
    cuda = dev.type == "cuda"
    assets = Path(args.assets)
    flops: list[float | None] = [None]  # counted once: the variants compute the same arithmetic

    def config_of(variant: str):
        return recipe(shape, assets, dev.type, VARIANTS[variant])

    def fixed_batch(ready: Ready) -> Batch:
        ids = ready.flamingo.special_ids
        return make_batch(
            shape, shape.batch, shape.seq, shape.images, ids.media, ids.end_of_chunk, ids.pad, 0
        )

    def measure(variant: str, profile_it: bool) -> None:
        started = time.perf_counter()
        ready = build(config_of(variant), dist, variant)
        rec("build", **ready.labels, build_s=round(time.perf_counter() - started, 1), **describe(ready, dev))
        base = fixed_batch(ready)
        step = make_step(ready, base, dev)
        reset_peak(dev)
        started = time.perf_counter()
        for _ in range(shape.warmup):  # compilation, the optimizer state, the allocator's pools
            step()
        sync(dev)
        warmup_s = time.perf_counter() - started
        times = timed(step, dev, 0, shape.runs)
        peak = peak_gb(dev)
        if flops[0] is None:
            flops[0] = step_flops(step)
        record = step_record(times, shape.batch * shape.seq, flops[0], dev)
        rec(
            "train_step",
            **ready.labels,
            batch=shape.batch,
            seq=shape.seq,
            images=shape.images,
            warmup_s=round(warmup_s, 2),
            **{**record, "peak_mem_gb": peak},
        )
        if profile_it:
            profile(ready, step, base)

    def profile(ready: Ready, step: Callable[..., None], base: Batch) -> None:
        clock = Clock(dev)
        phases: dict[str, list[float]] = defaultdict(list)
        for _ in range(max(1, shape.runs // 2)):
            marks = [("start", clock.now())]
            step(lambda phase, marks=marks: marks.append((phase, clock.now())))
            sync(dev)
            for (_, a), (phase, b) in zip(marks, marks[1:], strict=False):
                phases[phase].append(clock.seconds(a, b))
        # The frozen vision tower alone, forward without gradients: the share that precomputed features would save.
        pixels = base.images.to(dev).flatten(0, 2)
        vision_runs = max(1, shape.runs // 2)
        vision_start = clock.now()
        with torch.autocast(dev.type, dtype=ready.amp or torch.float32, enabled=ready.amp is not None):
            with torch.no_grad():
                for _ in range(vision_runs):
                    ready.flamingo.vision_encoder(pixels)
        vision_end = clock.now()
        sync(dev)
        medians = {f"{phase}_s": round(statistics.median(v), 4) for phase, v in phases.items()}
        rec(
            "phases",
            **ready.labels,
            **medians,
            step_s=round(sum(medians.values()), 4),
            vision_forward_s=round(clock.seconds(vision_start, vision_end) / vision_runs, 4),
        )
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        steps = 3
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(dev)
        kernels = top_kernels(prof, dev, steps, 10)
        for kernel in kernels:
            rec("kernel", **ready.labels, **kernel)
        unit = "CUDA" if cuda else "CPU"
        table = kernel_table(kernels, unit)
        ops = prof.key_averages().table(
            sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
            row_limit=25,
            max_name_column_width=80,
        )
        print(table, flush=True)
        Path(args.profile_table).write_text(
            f"top-10 {unit} kernels of {steps} steps ({ready.labels})\n{table}\n\nby operator\n{ops}\n"
        )

    def search(variant: str) -> None:
        ready = build(config_of(variant), dist, variant)
        base = fixed_batch(ready)
        largest_batch(
            rec, shape, dev, lambda b: make_step(ready, base.repeat(b // shape.batch), dev), **ready.labels
        )
        ready.optimizer.zero_grad(set_to_none=True)  # a step that ran out of memory may have left gradients

    def generate() -> None:
        from openflamingo.model.checkpoint import build_or_load

        model = build_or_load(config_of("eager").model, seed=0).to(dev).eval()
        if cuda:
            model.to(torch.bfloat16)
        ids = model.special_ids
        prompts = prompt_batch(shape, ids.media, ids.pad).to(dev, torch.bfloat16 if cuda else torch.float32)

        def gen() -> torch.Tensor:
            return model.generate(
                input_ids=prompts.ids,
                images=prompts.images,
                attention_mask=prompts.attn,
                max_new_tokens=shape.gen_new,
                min_new_tokens=shape.gen_new,
                do_sample=False,
                num_beams=1,
            )

        reset_peak(dev)
        out = gen()  # warm-up
        times = timed(gen, dev, 0, max(1, shape.runs // 3))
        rec("generate", **gen_record(times, out, shape, dev))

    for i, variant in enumerate(args.variants):
        if "train" in args.what or ("profile" in args.what and i == 0):
            rec.stage(
                f"train_{variant}", lambda v=variant, i=i: measure(v, "profile" in args.what and i == 0)
            )
        if "maxbatch" in args.what:
            rec.stage(f"maxbatch_{variant}", lambda v=variant: search(v))
    if "gen" in args.what:
        rec.stage("generate", generate)


def describe(ready: Ready, dev: torch.device) -> dict[str, Any]:
    return dict(
        device=device_name(dev),
        torch=torch.__version__,
        transformers=package_version("transformers"),
        **param_counts(ready.flamingo),
    )


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument(
        "--what", nargs="+", default=["train", "profile"], choices=["train", "profile", "gen", "maxbatch"]
    )
    ap.add_argument("--variants", nargs="+", default=["default", "eager"], choices=list(VARIANTS))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="as train.device")
    ap.add_argument("--profile-table", default="profile.txt")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="--size tiny, the first variant only, one step untimed and one timed; writes the assets if missing",
    )
    args = ap.parse_args()
    shape = SHAPES["tiny" if args.smoke else args.size]
    if args.smoke:
        args.size, args.what, args.variants = "tiny", ["train"], args.variants[:1]
        shape = dataclasses.replace(shape, warmup=1, runs=1)
        if not (Path(args.assets) / "lm" / "config.json").is_file():
            make_assets(shape, Path(args.assets))
    from openflamingo.train import distributed

    rec = Recorder(Path(args.jsonl), impl="ours", size=args.size)
    dist = distributed.setup(args.device)
    try:
        run_ours(args, shape, dist, rec)
    finally:
        distributed.teardown(dist)
    sys.exit(1 if rec.errors else 0)


if __name__ == "__main__":
    main()
