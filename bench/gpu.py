#!/usr/bin/env python
"""GPU side by side: our openflamingo vs OpenFlamingo 2.0.1 on the same random-weight model and batch.

bench/gpu.sh runs each subcommand in its own process (the peer with its own PYTHONPATH: transformers 4.57):

    gpu.py assets   --assets DIR                  tokenizer + random Llama LM directory, read by both
    gpu.py ours     --assets DIR --what train profile gen | maxbatch
    gpu.py peer     --assets DIR --what train gen | maxbatch
    gpu.py cli-args --assets DIR --run-dir DIR    overrides for `python -m openflamingo.train --config RECIPE`
    gpu.py cli      --metrics FILE --wall-s S --rc RC    one JSON line from the CLI run's metrics.jsonl
    gpu.py summary                                ratios ours / peer from the JSON lines

Every measurement is one JSON line, appended to --jsonl and printed. Shape "of3b" (OpenFlamingo-3B): Llama LM
2048 x 22 layers, 32 heads (multi-head as MPT-1B: torch 2.11's FlopCounterMode fails on grouped-query SDPA),
FFN 5632, vocab 32k; CLIP ViT-L/14 at 224 px with QuickGELU; perceiver 6 x 64 latents; a gated cross-attention
block before every LM layer. Bare step: forward, backward, clip, AdamW under bf16 autocast on a fixed batch of
16 x 256 tokens x 6 images without padding and OpenFlamingo's label masking. "tiny" is the CPU smoke test.
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
import torch.nn.functional as F

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


def count_flops(fn: Callable[[], None]) -> float | None:
    """FLOPs of one call by FlopCounterMode (matmuls, convolutions, attention); None if the counter fails."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
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
    rec: Recorder, shape: Shape, dev: torch.device, step_at: Callable[[int], Callable[[], None]], frozen: str
) -> None:
    """Double the batch from shape.batch (16, 32, 64, ...) until CUDA runs out of memory, the cap, or the time.
    Each trial: one warm-up step and one timed step. `step_at(B)` returns a step over a batch of B samples."""
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
                frozen_dtype=frozen,
                batch=batch,
                fits=True,
                step_s=round(times[0], 4),
                tokens_per_s=round(batch * shape.seq / times[0], 1),
                peak_mem_gb=peak_gb(dev),
            )
            largest = batch
        except torch.cuda.OutOfMemoryError:
            rec("batch_trial", frozen_dtype=frozen, batch=batch, fits=False)
            stop = "oom"
            break
        finally:
            release()
        last_s = time.time() - started
        batch *= 2
    rec(
        "max_batch",
        frozen_dtype=frozen,
        largest=largest,
        stopped_by=stop,
        first_failing=batch if stop == "oom" else None,
        seq=shape.seq,
        images=shape.images,
    )


# ----- assets ---------------------------------------------------------------------------------------------------
def make_assets(shape: Shape, out: Path) -> None:
    """A word-level tokenizer of `vocab` tokens and a random fp32 Llama LM, saved where both sides load them from.
    Built with the peer's transformers 4.x (gpu.sh), whose files transformers 5 reads too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = specials + [f"w{i}" for i in range(shape.vocab - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
    ).save_pretrained(out / "lm")
    config = LlamaConfig(
        vocab_size=shape.vocab,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        **shape.lm,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out / "lm", safe_serialization=True)


# ----- ours -----------------------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace, shape: Shape, dev: torch.device, rec: Recorder) -> None:
    from openflamingo import (
        CrossAttentionConfig,
        FlamingoConfig,
        PerceiverConfig,
        VisionConfig,
        build_flamingo,
    )
    from openflamingo.model.inputs import to_device
    from openflamingo.train.config import TrainConfig
    from openflamingo.train.optim import build_optimizer
    from openflamingo.train.parallelize import cast_frozen
    from openflamingo.train.prefetch import prepare_batch

    started = time.perf_counter()
    config = FlamingoConfig(
        language_model=str(Path(args.assets) / "lm"),
        vision=VisionConfig("hf_clip", config={**shape.vit, "hidden_act": "quick_gelu"}),
        perceiver=PerceiverConfig(depth=shape.perceiver_depth, num_latents=shape.perceiver_latents),
        cross_attention=CrossAttentionConfig(every_n_layers=shape.every),
    )
    model = build_flamingo(config, seed=0)
    ids = model.special_ids
    rec(
        "build",
        build_s=round(time.perf_counter() - started, 1),
        device=device_name(dev),
        torch=torch.__version__,
        transformers=package_version("transformers"),
        **param_counts(model),
    )
    cuda = dev.type == "cuda"
    # What `openflamingo train` does by default: frozen weights in bf16 on a GPU (fp32 on a CPU, no autocast there).
    default_frozen = "bf16" if cuda else "fp32"
    base = make_batch(
        shape, shape.batch, shape.seq, shape.images, ids.media, ids.end_of_chunk, ids.pad, seed=0
    )

    def prepare(frozen: str) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
        cast_frozen(model, torch.bfloat16 if frozen == "bf16" else torch.float32)
        model.to(dev).train()
        # The project's own optimizer with the loop's defaults, so its options (e.g. fused AdamW) are measured.
        return build_optimizer(model, TrainConfig(lr=1e-4)), [
            p for p in model.parameters() if p.requires_grad
        ]

    def make_step(
        opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], batch: Batch
    ) -> Callable[..., None]:
        # What the training loop's step runs on a micro-batch (train/loop.py forward_backward): checked and
        # prepared on the CPU (logit positions as indices, targets), then only device work, no host sync.
        loader_batch = dict(
            input_ids=batch.ids, attention_mask=batch.attn, labels=batch.labels, images=batch.images
        )
        prepared = to_device(prepare_batch(model, loader_batch), dev)

        def step(mark: Callable[[str], None] = lambda phase: None) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(**prepared["inputs"], validate_inputs=False).logits
            mark("forward")
            F.cross_entropy(logits.float(), prepared["targets"]).backward()
            mark("backward")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            mark("clip")
            opt.step()
            opt.zero_grad(set_to_none=True)
            mark("optimizer")

        return step

    def train(frozen: str) -> None:
        opt, params = prepare(frozen)
        step = make_step(opt, params, base)
        reset_peak(dev)
        times = timed(step, dev, shape.warmup, shape.runs)
        rec(
            "train_step",
            frozen_dtype=frozen,
            batch=shape.batch,
            seq=shape.seq,
            images=shape.images,
            **step_record(times, shape.batch * shape.seq, count_flops(step), dev),
        )

    def profile() -> None:
        opt, params = prepare(default_frozen)
        step = make_step(opt, params, base)
        for _ in range(shape.warmup):  # also allocates the optimizer state
            step()
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
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda), torch.no_grad():
            for _ in range(vision_runs):
                model.vision_encoder(pixels)
        vision_end = clock.now()
        sync(dev)
        medians = {f"{phase}_s": round(statistics.median(v), 4) for phase, v in phases.items()}
        rec(
            "phases",
            frozen_dtype=default_frozen,
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
            rec("kernel", frozen_dtype=default_frozen, **kernel)
        unit = "CUDA" if cuda else "CPU"
        table = kernel_table(kernels, unit)
        ops = prof.key_averages().table(
            sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
            row_limit=25,
            max_name_column_width=80,
        )
        print(table, flush=True)
        Path(args.profile_table).write_text(
            f"top-10 {unit} kernels of {steps} bare steps ({default_frozen} frozen)\n"
            f"{table}\n\nby operator\n{ops}\n"
        )

    def generate() -> None:
        model.to(dev).eval()
        if cuda:
            model.to(torch.bfloat16)
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

    def search() -> None:
        opt, params = prepare(default_frozen)
        largest_batch(
            rec, shape, dev, lambda b: make_step(opt, params, base.repeat(b // shape.batch)), default_frozen
        )
        opt.zero_grad(set_to_none=True)  # a step that ran out of memory may have left gradients

    if "train" in args.what:
        for frozen in ("bf16", "fp32") if cuda else ("fp32",):
            rec.stage(f"train_{frozen}", lambda frozen=frozen: train(frozen))
    if "profile" in args.what:
        rec.stage("profile", profile)
    if "maxbatch" in args.what:  # before generate, which casts the whole model to bf16
        rec.stage("maxbatch", search)
    if "gen" in args.what:
        rec.stage("generate", generate)


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


# ----- the peer: open_flamingo 2.0.1 ----------------------------------------------------------------------------
def run_peer(args: argparse.Namespace, shape: Shape, dev: torch.device, rec: Recorder) -> None:
    import open_clip
    from open_flamingo import create_model_and_transforms

    started = time.perf_counter()
    # The same ViT as ours, QuickGELU as in the "openai" ViT-L/14 OpenFlamingo loads; a 1-layer text tower, which
    # OpenFlamingo drops (it keeps the visual tower only).
    v = shape.vit
    clip_config = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": v["image_size"],
            "layers": v["num_hidden_layers"],
            "width": v["hidden_size"],
            "head_width": v["hidden_size"] // v["num_attention_heads"],
            "patch_size": v["patch_size"],
            "mlp_ratio": v["intermediate_size"] / v["hidden_size"],
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    clip_path = Path(args.assets) / f"bench-vit-{args.size}.json"
    clip_path.write_text(json.dumps(clip_config))
    open_clip.add_model_config(str(clip_path))
    torch.manual_seed(0)
    lm = str(Path(args.assets) / "lm")
    model, _, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=clip_path.stem,
        clip_vision_encoder_pretrained=None,
        lang_encoder_path=lm,
        tokenizer_path=lm,
        cross_attn_every_n_layers=shape.every,
        use_local_files=True,
    )
    media, eoc, pad = model.media_token_id, model.eoc_token_id, tokenizer.pad_token_id
    rec(
        "build",
        build_s=round(time.perf_counter() - started, 1),
        device=device_name(dev),
        torch=torch.__version__,
        transformers=package_version("transformers"),
        **param_counts(model),
    )
    cuda = dev.type == "cuda"
    base = make_batch(shape, shape.batch, shape.seq, shape.images, media, eoc, pad, seed=0)
    embedding = model.lang_encoder.get_input_embeddings()

    def optimizer() -> torch.optim.Optimizer:
        # open_flamingo/train/train.py: AdamW, weight decay on the gated cross-attention parameters only
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (decay if "gated_cross_attn" in name else no_decay).append(param)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4
        )

    def make_step(opt: torch.optim.Optimizer, batch: Batch) -> Callable[[], None]:
        batch = batch.to(dev)

        def step() -> None:  # open_flamingo/train/train_utils.py train_one_epoch with amp_bf16, no FSDP
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(
                    vision_x=batch.images, lang_x=batch.ids, attention_mask=batch.attn, labels=batch.labels
                )[0]
            loss.backward()
            # only the <image> and <|endofchunk|> rows of the input embedding learn
            if embedding.weight.grad is not None:
                keep = torch.zeros_like(embedding.weight.grad)
                keep[media] = 1
                keep[eoc] = 1
                embedding.weight.grad = embedding.weight.grad * keep
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def train() -> None:
        model.to(dev).train()
        step = make_step(optimizer(), base)
        reset_peak(dev)
        times = timed(step, dev, shape.warmup, shape.runs)
        rec(
            "train_step",
            frozen_dtype="fp32",
            batch=shape.batch,
            seq=shape.seq,
            images=shape.images,
            **step_record(times, shape.batch * shape.seq, count_flops(step), dev),
        )

    def generate() -> None:
        dtype = torch.bfloat16 if cuda else torch.float32
        model.to(dev, dtype).eval()
        prompts = prompt_batch(shape, media, pad).to(dev, dtype)

        def gen() -> torch.Tensor:
            with torch.no_grad():
                return model.generate(
                    prompts.images,
                    prompts.ids,
                    prompts.attn,
                    max_new_tokens=shape.gen_new,
                    min_new_tokens=shape.gen_new,
                    num_beams=1,
                    do_sample=False,
                    pad_token_id=pad,
                )

        reset_peak(dev)
        out = gen()  # warm-up
        times = timed(gen, dev, 0, max(1, shape.runs // 3))
        rec("generate", **gen_record(times, out, shape, dev))

    def search() -> None:
        model.to(dev).train()
        opt = optimizer()
        largest_batch(rec, shape, dev, lambda b: make_step(opt, base.repeat(b // shape.batch)), "fp32")
        opt.zero_grad(set_to_none=True)  # a step that ran out of memory may have left gradients

    if "train" in args.what:
        rec.stage("train_fp32", train)
    if "maxbatch" in args.what:
        rec.stage("maxbatch", search)
    if "gen" in args.what:
        rec.stage("generate", generate)


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


# ----- the CLI run ----------------------------------------------------------------------------------------------
def cli_args(shape: Shape, assets: Path, run_dir: Path) -> list[str]:
    """Overrides of bench/of3b-synthetic.toml: where the assets and the run live, and the shape if not of3b."""
    args = ["--model.language_model", str(assets / "lm"), "--train.output_dir", str(run_dir), *shape.cli]
    if shape.cli:
        vit = {**shape.vit, "hidden_act": "quick_gelu"}
        args += [
            "--model.vision.config",
            "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in vit.items()) + "}",
        ]
    if not torch.cuda.is_available():  # bf16 autocast is for GPUs (and far slower than fp32 on most CPUs)
        args += ["--precision.autocast", "fp32", "--precision.frozen_dtype", "fp32"]
    return args


def cli_record(metrics: Path, wall_s: float, rc: int, rec: Recorder) -> None:
    """The CLI's own logged numbers (one record per log interval): medians over the intervals after the first,
    which holds the warm-up, and each interval's tokens/s."""
    rows = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if metrics.is_file()
        else []
    )
    steady = rows[1:] or rows

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return round(statistics.median(values), 4) if values else None

    rec(
        "cli",
        rc=rc,
        wall_s=round(wall_s, 1),
        logged_steps=[r.get("step") for r in rows],
        tokens_per_s_each=[round(r["tokens_per_s"], 1) for r in rows if "tokens_per_s" in r],
        step_time_s=median("step_time_s"),
        tokens_per_s=median("tokens_per_s"),
        mfu=median("mfu"),
        data_wait_frac=median("data_wait_frac"),
        final_loss=rows[-1].get("loss") if rows else None,
    )


# ----- summary ----------------------------------------------------------------------------------------------------
def summarize(path: Path, rec: Recorder) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def find(impl: str, what: str, **match: Any) -> dict[str, Any]:
        found = [
            r
            for r in records
            if r.get("impl") == impl
            and r.get("what") == what
            and all(r.get(k) == v for k, v in match.items())
        ]
        return found[-1] if found else {}

    def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
        x, y = a.get(key), b.get(key)
        return round(x / y, 3) if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None

    ours_train = find("ours", "train_step", frozen_dtype="bf16") or find(
        "ours", "train_step", frozen_dtype="fp32"
    )
    ours_fp32 = find("ours", "train_step", frozen_dtype="fp32")
    peer_train = find("peer", "train_step")
    ours_gen, peer_gen = find("ours", "generate"), find("peer", "generate")
    ours_max, peer_max = find("ours", "max_batch"), find("peer", "max_batch")
    cli = find("ours", "cli")
    problems = [
        {k: r.get(k) for k in ("impl", "what", "stage", "rc", "error") if k in r}
        for r in records
        if r.get("what") == "error" or (r.get("what") == "stage" and r.get("rc") != 0)
    ]
    rec(
        "summary",
        ours_over_peer=dict(
            train_tokens_per_s=ratio(ours_train, peer_train, "tokens_per_s"),
            train_tokens_per_s_frozen_fp32=ratio(ours_fp32, peer_train, "tokens_per_s"),
            train_peak_mem=ratio(ours_train, peer_train, "peak_mem_gb"),
            gen_new_tokens_per_s=ratio(ours_gen, peer_gen, "new_tokens_per_s"),
            gen_peak_mem=ratio(ours_gen, peer_gen, "peak_mem_gb"),
            max_batch=ratio(ours_max, peer_max, "largest"),
            cli_tokens_per_s_over_peer_bare_step=ratio(cli, peer_train, "tokens_per_s"),
        ),
        ours=dict(
            train_s=ours_train.get("median_s"),
            train_frozen=ours_train.get("frozen_dtype"),
            tokens_per_s=ours_train.get("tokens_per_s"),
            mfu=ours_train.get("mfu"),
            peak_mem_gb=ours_train.get("peak_mem_gb"),
            gen_new_tokens_per_s=ours_gen.get("new_tokens_per_s"),
            max_batch=ours_max.get("largest"),
            cli_tokens_per_s=cli.get("tokens_per_s"),
            cli_mfu=cli.get("mfu"),
            cli_data_wait_frac=cli.get("data_wait_frac"),
        ),
        peer=dict(
            train_s=peer_train.get("median_s"),
            tokens_per_s=peer_train.get("tokens_per_s"),
            mfu=peer_train.get("mfu"),
            peak_mem_gb=peer_train.get("peak_mem_gb"),
            gen_new_tokens_per_s=peer_gen.get("new_tokens_per_s"),
            max_batch=peer_max.get("largest"),
        ),
        problems=problems,
    )


# ----- main -------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["assets", "ours", "peer", "cli-args", "cli", "summary"])
    ap.add_argument("--size", default="of3b", choices=sorted(SHAPES))
    ap.add_argument("--assets", default="/tmp/bench-assets")
    ap.add_argument("--jsonl", default="bench.jsonl", help="where the JSON lines are appended")
    ap.add_argument(
        "--what",
        nargs="+",
        default=["train", "profile", "gen"],
        choices=["train", "profile", "gen", "maxbatch"],
    )
    ap.add_argument("--profile-table", default="profile.txt")
    ap.add_argument("--run-dir", default="/tmp/bench-run", help="cli-args: the CLI run's output_dir")
    ap.add_argument("--metrics", default="/tmp/bench-run/metrics.jsonl", help="cli: the run's metrics.jsonl")
    ap.add_argument("--wall-s", type=float, default=0.0, help="cli: the run's wall time")
    ap.add_argument("--rc", type=int, default=0, help="cli: the run's exit status")
    args = ap.parse_args()
    shape = SHAPES[args.size]
    impl = args.command if args.command in ("ours", "peer") else "ours" if args.command == "cli" else None
    rec = Recorder(Path(args.jsonl), **({"impl": impl} if impl else {}), size=args.size)

    if args.command in ("assets", "peer") and os.environ.get("PEER_TOOLS"):
        # CPU smoke test in the peer venv: its torchvision is a CUDA build that needs this shim to import.
        sys.path.insert(0, os.environ["PEER_TOOLS"])
        import peer_common  # noqa: F401
    if args.command == "assets":
        started = time.perf_counter()
        make_assets(shape, Path(args.assets))
        rec("assets", dir=args.assets, seconds=round(time.perf_counter() - started, 1))
    elif args.command == "cli-args":
        print("\n".join(cli_args(shape, Path(args.assets), Path(args.run_dir))))
    elif args.command == "cli":
        cli_record(Path(args.metrics), args.wall_s, args.rc, rec)
    elif args.command == "summary":
        summarize(Path(args.jsonl), rec)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rec.stage("build", lambda: (run_ours if impl == "ours" else run_peer)(args, shape, dev, rec))
    sys.exit(1 if rec.errors else 0)


if __name__ == "__main__":
    main()
