"""What both sides of bench/gpu.sh share: the shapes, the JSON-line recorder, timing, the fixed batch and
OpenFlamingo's label masking, the profile table and the largest-batch search.

Imports torch only (never openflamingo): the peer's side runs it under its own PYTHONPATH and transformers 4.57.
Shape "of3b" (OpenFlamingo-3B): Llama LM 2048 x 22 layers, 32 heads (multi-head as MPT-1B), FFN 5632, vocab 32k;
CLIP ViT-L/14 at 224 px with QuickGELU; perceiver 6 x 64 latents; a gated cross-attention block before every LM
layer; 16 x 256 tokens x 6 images per step without padding, OpenFlamingo's label masking. "tiny" is the CPU smoke
test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

H100_H200_BF16_FLOPS = 989e12  # dense bf16 peak, the MFU denominator the issue uses


@dataclass(frozen=True)
class Shape:
    lm: dict[str, int]  # LlamaConfig fields
    vocab: int
    vit: dict[str, int]  # CLIPVisionConfig fields (QuickGELU is added where each side builds it)
    perceiver_depth: int
    perceiver_latents: int
    every: int  # a cross-attention block before every `every`-th LM layer
    batch: int  # bare training step: batch x seq tokens, `images` images per sample
    seq: int
    images: int
    gen_batch: int  # generation: gen_batch prompts of one image + gen_prompt - 1 tokens, gen_new new tokens
    gen_prompt: int
    gen_new: int
    warmup: int  # untimed training steps before the timed ones
    runs: int  # timed training steps (generation: runs // 3 timed calls after one warm-up)
    max_batch: int  # where the doubling search for the largest batch stops if nothing runs out of memory
    search_s: float  # and its time budget
    cli: tuple[str, ...]  # overrides of the CLI recipe (bench/of3b-synthetic.toml is the of3b shape)


SHAPES = {
    "of3b": Shape(
        lm=dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=2048,
        ),
        vocab=32000,
        vit=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        ),
        perceiver_depth=6,
        perceiver_latents=64,
        every=1,
        batch=16,
        seq=256,
        images=6,
        gen_batch=8,
        gen_prompt=32,
        gen_new=64,
        warmup=3,
        runs=10,
        max_batch=1024,
        search_s=90,
        cli=(),
    ),
    # CPU smoke test. OpenFlamingo's perceiver is always 6 x 64 latents, so here the two sides differ in size.
    "tiny": Shape(
        lm=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
        ),
        vocab=1000,
        vit=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        perceiver_depth=1,
        perceiver_latents=8,
        every=2,
        batch=2,
        seq=64,
        images=2,
        gen_batch=2,
        gen_prompt=16,
        gen_new=8,
        warmup=1,
        runs=3,
        max_batch=8,
        search_s=30,
        cli=(
            "--model.perceiver.depth",
            "1",
            "--model.perceiver.num_latents",
            "8",
            "--model.cross_attention.every_n_layers",
            "2",
            "--datasets.interleaved.batch_size",
            "2",
            "--datasets.interleaved.seq_len",
            "64",
            "--datasets.interleaved.max_images",
            "2",
            "--datasets.pairs.batch_size",
            "2",
            "--datasets.pairs.seq_len",
            "16",
            "--train.steps",
            "4",
            "--log.every",
            "2",
        ),
    ),
}


# ----- recording ------------------------------------------------------------------------------------------------
class Recorder:
    """Appends one JSON line per measurement to `path` and prints it."""

    def __init__(self, path: Path, **base: Any):
        self.path = path
        self.base = base
        self.errors = 0

    def __call__(self, what: str, **fields: Any) -> None:
        line = json.dumps({**self.base, "what": what, **fields})
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)

    def stage(self, name: str, fn: Callable[[], None]) -> None:
        """Run one measurement; an error becomes a record and the next measurement still runs."""
        try:
            fn()
        except Exception as error:  # report it and keep the other measurements
            import traceback

            traceback.print_exc()
            self.errors += 1
            self("error", stage=name, error=f"{type(error).__name__}: {error}"[:500])
        finally:
            release()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None


def timed(fn: Callable[[], object], dev: torch.device, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - start)
    return times


def count_flops(fn: Callable[[], None], counter_mode: Callable[[], Any] | None = None) -> float | None:
    """FLOPs of one call by FlopCounterMode (matmuls, convolutions, attention), or by `counter_mode()` (ours passes
    the training loop's own counter); None if the counter fails."""
    from torch.utils.flop_counter import FlopCounterMode

    make = counter_mode or (lambda: FlopCounterMode(display=False))
    try:
        with make() as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception as error:  # e.g. a counter that does not know an attention variant
        print(f"flop count failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def step_record(times: list[float], tokens: int, flops: float | None, dev: torch.device) -> dict[str, Any]:
    median = statistics.median(times)
    mfu = flops / median / H100_H200_BF16_FLOPS if flops and dev.type == "cuda" else None
    return dict(
        median_s=round(median, 4),
        times=[round(t, 4) for t in times],
        tokens_per_s=round(tokens / median, 1),
        flops_per_step=flops,
        mfu=None if mfu is None else round(mfu, 4),
        peak_mem_gb=peak_gb(dev),
    )


# ----- batches --------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    ids: torch.Tensor  # (B, L)
    attn: torch.Tensor  # (B, L), all ones: no padding
    images: torch.Tensor  # (B, T, 1, 3, H, W)
    labels: torch.Tensor  # (B, L), -100 where no loss

    def to(self, dev: torch.device, image_dtype: torch.dtype = torch.float32) -> Batch:
        return Batch(
            self.ids.to(dev), self.attn.to(dev), self.images.to(dev, image_dtype), self.labels.to(dev)
        )

    def repeat(self, times: int) -> Batch:
        return Batch(
            self.ids.repeat(times, 1),
            self.attn.repeat(times, 1),
            self.images.repeat(times, 1, 1, 1, 1, 1),
            self.labels.repeat(times, 1),
        )


def openflamingo_labels(ids: torch.Tensor, media: int, eoc: int, pad: int) -> torch.Tensor:
    """OpenFlamingo's MMC4 label mask (open_flamingo/train/train_utils.py) without its Python loops: no loss on
    padding, on text before the first <image>, on text after an <|endofchunk|> up to the next <image>, and on
    <image> itself."""
    position = torch.arange(ids.shape[1]).expand_as(ids)
    none = torch.full_like(ids, -1)
    last_media = torch.where(ids == media, position, none).cummax(1).values  # at or before each position
    last_eoc = torch.where(ids == eoc, position, none).cummax(1).values
    last_eoc_before = torch.cat(
        [none[:, :1], last_eoc[:, :-1]], 1
    )  # strictly before: <|endofchunk|> keeps its loss
    masked = (ids == pad) | (last_media < 0) | (last_eoc_before > last_media) | (ids == media)
    return ids.masked_fill(masked, -100)


def make_batch(
    shape: Shape, batch: int, seq: int, images: int, media: int, eoc: int, pad: int, seed: int
) -> Batch:
    """`images` chunks of `<image> text <|endofchunk|>` per sample filling `seq` tokens; random ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, shape.vocab, (batch, seq), generator=g)
    chunk = seq // images
    for b in range(batch):
        for t in range(images):
            start = t * chunk + b % 3
            ids[b, start] = media
            ids[b, min(start + chunk - 4 - b % 2, seq - 1)] = eoc
    size = shape.vit["image_size"]
    pixels = torch.randn(batch, images, 1, 3, size, size, generator=g)
    return Batch(ids, torch.ones_like(ids), pixels, openflamingo_labels(ids, media, eoc, pad))


def prompt_batch(shape: Shape, media: int, pad: int) -> Batch:
    """Generation prompts: <image> then gen_prompt - 1 random ordinary tokens, one image each."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, shape.vocab, (shape.gen_batch, shape.gen_prompt), generator=g)
    ids[:, 0] = media
    size = shape.vit["image_size"]
    pixels = torch.randn(shape.gen_batch, 1, 1, 3, size, size, generator=g)
    return Batch(ids, torch.ones_like(ids), pixels, torch.full_like(ids, -100))


# ----- phase clock and profile table -------------------------------------------------------------------------
class Clock:
    """Timestamps that cost no host synchronisation: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


def top_kernels(prof: torch.profiler.profile, dev: torch.device, steps: int, n: int) -> list[dict[str, Any]]:
    """The n kernels with the most GPU time (on a CPU: the ops with the most self CPU time), per step."""
    from torch.autograd import DeviceType

    want = DeviceType.CUDA if dev.type == "cuda" else DeviceType.CPU
    total_us: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    for event in prof.events():
        # User annotations (record_function, e.g. "Optimizer.step#AdamW.step") are ranges, not kernels.
        if event.device_type != want or getattr(event, "is_user_annotation", False):
            continue
        us = event.time_range.elapsed_us() if dev.type == "cuda" else event.self_cpu_time_total
        total_us[event.name] += us
        calls[event.name] += 1
    all_us = sum(total_us.values()) or 1.0
    top = sorted(total_us.items(), key=lambda kv: -kv[1])[:n]
    return [
        dict(
            rank=i + 1,
            name=name[:160],
            ms_per_step=round(us / steps / 1000, 3),
            share=round(us / all_us, 4),
            calls_per_step=round(calls[name] / steps, 1),
            all_ms_per_step=round(all_us / steps / 1000, 3),
        )
        for i, (name, us) in enumerate(top)
    ]


def kernel_table(kernels: list[dict[str, Any]], unit: str) -> str:
    lines = [f"{'rank':>4}  {unit + ' ms/step':>13}  {'share':>6}  {'calls/step':>10}  name"]
    lines += [
        f"{k['rank']:>4}  {k['ms_per_step']:>13.3f}  {k['share']:>6.1%}  {k['calls_per_step']:>10}  {k['name']}"
        for k in kernels
    ]
    return "\n".join(lines)


# ----- the largest batch that fits ---------------------------------------------------------------------------
def largest_batch(
    rec: Recorder,
    shape: Shape,
    dev: torch.device,
    step_at: Callable[[int], Callable[[], None]],
    **labels: Any,
) -> None:
    """Double the batch from shape.batch (16, 32, 64, ...) until CUDA runs out of memory, the cap, or the time.
    Each trial: one warm-up step and one timed step. `step_at(B)` returns a step over a batch of B samples; `labels`
    go into every record."""
    deadline = time.time() + shape.search_s
    if os.environ.get("STAGE_DEADLINE"):  # gpu.sh: when this process will be stopped, less a margin
        deadline = min(deadline, float(os.environ["STAGE_DEADLINE"]))
    largest, stop, last_s, batch = None, "cap", 0.0, shape.batch
    while batch <= shape.max_batch:
        # The next trial has twice the batch: about twice the last trial's time (two steps of it).
        if time.time() + 2.5 * last_s > deadline:
            stop = "time"
            break
        started = time.time()
        try:
            reset_peak(dev)
            times = timed(step_at(batch), dev, warmup=1, runs=1)
            rec(
                "batch_trial",
                **labels,
                batch=batch,
                fits=True,
                step_s=round(times[0], 4),
                tokens_per_s=round(batch * shape.seq / times[0], 1),
                peak_mem_gb=peak_gb(dev),
            )
            largest = batch
        except torch.cuda.OutOfMemoryError:
            rec("batch_trial", **labels, batch=batch, fits=False)
            stop = "oom"
            break
        finally:
            release()
        last_s = time.time() - started
        batch *= 2
    rec(
        "max_batch",
        **labels,
        largest=largest,
        stopped_by=stop,
        first_failing=batch if stop == "oom" else None,
        seq=shape.seq,
        images=shape.images,
    )


def gen_record(times: list[float], out: torch.Tensor, shape: Shape, dev: torch.device) -> dict[str, Any]:
    median = statistics.median(times)
    return dict(
        median_s=round(median, 4),
        times=[round(t, 4) for t in times],
        prompts=shape.gen_batch,
        new_tokens=int(out.shape[1] - shape.gen_prompt),
        new_tokens_per_s=round(shape.gen_batch * shape.gen_new / median, 1),
        peak_mem_gb=peak_gb(dev),
    )


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    return dict(
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
    )


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ----- command line -----------------------------------------------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every script of bench/gpu takes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="of3b", choices=sorted(SHAPES))
    ap.add_argument(
        "--assets", default="/tmp/bench-assets", help="the tokenizer and LM directory (assets.py)"
    )
    ap.add_argument("--jsonl", default="bench.jsonl", help="where the JSON lines are appended")
    return ap


def peer_venv_shim() -> None:
    """CPU smoke test in the peer venv (PEER_TOOLS set): its torchvision is a CUDA build that needs this shim."""
    if os.environ.get("PEER_TOOLS"):
        sys.path.insert(0, os.environ["PEER_TOOLS"])
        import peer_common  # noqa: F401
