"""CPU side by side: our openflamingo vs OpenFlamingo 2.0.1 (the peer) on the same random-weight model.

    .venv/bin/python bench/train.py --peer-python /tmp/peer-venv/bin/python [--rounds 3] [--out results.jsonl]
    .venv/bin/python bench/train.py --profile packed      # torch.profiler top ops of ours (assets of a full run)
    .venv/bin/python bench/train.py --summarize results.jsonl   # the table of a saved run again

Model (the peer harness's "small" config): a Llama LM of 8 layers x 512 (8 heads, FFN 2048, vocab 32k, untied
head), CLIP ViT-B/32 at 224 px (QuickGELU, patch tokens without the final norm), perceiver 6 x 64 latents, a gated
cross-attention block every 2 LM layers. The LM's random weights and the tokenizer are written once to --assets
(by the peer's Python: transformers 4.x writes files that 5.x reads), so both load the same frozen LM; the new parts
are initialised by each implementation. fp32, 2 torch threads.

Measurements, each in its own child process (so ru_maxrss is that measurement's peak RSS), ours and the peer's
alternating (A B A B ...) for --rounds rounds; the table reports medians over rounds:
  train    same-math step on a fixed batch of 4 x 128 tokens x 2 images (no padding): forward, cross-entropy on
           OpenFlamingo's MMC4 labels, backward, clip_grad_norm_(1.0), AdamW. The peer does what
           open_flamingo/train/train_utils.py does per batch (including zeroing all input-embedding gradient rows
           but <image> and <|endofchunk|>). Ours runs what `openflamingo train` runs: `prefetch.prepare_batch`
           (outside the timing: the loop does it on its prefetch thread, and the peer's labels are made outside it
           too), `loop.forward_backward` (logits only where a label follows), clipping and `build_optimizer`'s AdamW.
  packed   MMC4-like documents (log-normal lengths, median 256 tokens, capped at --max-doc-tokens; 1-6 images each,
           `<image> text <|endofchunk|>` chunks; fixed seed), one epoch over the same documents. Both get the same
           batch shape budget: at most 4 rows x --max-doc-tokens positions per step. The peer takes 4 documents per
           step in order, right-padded to the longest and its images zero-padded to the batch's most (its own MMC4
           loader pads every document to 6 images and 256 tokens, truncating longer ones; both would cost it more
           here or drop tokens). Ours packs documents into 4 rows of --max-doc-tokens with the project's `Batcher`
           (document_ids: block-diagonal attention, each document sees only its own images). Useful tokens/s =
           document tokens / summed step time. One warm-up step on the fixed train batch comes first.
  generate 4 prompts of one image + 31 tokens, exactly 32 new tokens greedy (min = max new tokens), no_grad.

Foreign load: the machine is shared, so before each child the parent waits up to --wait-quiet seconds for other
processes to use < 0.2 cores, and each child records the cores other processes kept busy while it was timing
(/proc/stat minus the child's own CPU time, per wall second; 1.0 = one of the two cores taken). A measurement
taken while others used more than --max-foreign cores is rerun (--retries times); the last attempt counts, and the
discarded ones are printed with "discarded": true.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import torch

MARK = "@@"
VOCAB = 32000  # ordinary tokens of the assets' tokenizer; ids 0-2 are <unk> <s> </s>
LM = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=2048,
)
VIT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32
)
IMAGE_SIZE = 224
PERCEIVER = dict(depth=6, num_latents=64)
EVERY = 2  # a cross-attention block every 2 LM layers
TRAIN = dict(batch=4, seq=128, images=2)
GEN = dict(batch=4, prompt=32, new=32)
PACK_ROWS = 4  # packed: rows (ours) / documents (peer) per step
MEASUREMENTS = ("train", "packed", "packed-cached", "generate")
UNITS = {
    "train": "tokens/s",
    "packed": "useful tokens/s",
    "packed-cached": "useful tokens/s",
    "generate": "new tokens/s",
}
OURS_ONLY = {"packed-cached": "packed"}  # ours-only measurement -> the peer's measurement it is compared with


# ----------------------------------------------------------------------------------------------- machine load
def machine_busy_s() -> float:
    """CPU seconds the whole machine (all cores) has spent busy since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """Cores kept busy by other processes between start() and stop(), per wall second."""

    def start(self) -> None:
        self.machine, self.own, self.wall = machine_busy_s(), own_cpu_s(), time.perf_counter()

    def stop(self) -> float:
        wall = time.perf_counter() - self.wall
        foreign = (machine_busy_s() - self.machine) - (own_cpu_s() - self.own)
        return round(max(0.0, foreign) / wall, 3)


def wait_quiet(max_wait_s: float) -> float:
    """Wait (1 s samples) until other processes use < 0.2 cores or max_wait_s passed; returns the last sample."""
    deadline = time.time() + max_wait_s
    load = ForeignLoad()
    while True:
        load.start()
        time.sleep(1.0)
        busy = load.stop()
        if busy < 0.2 or time.time() >= deadline:
            return busy


# ----------------------------------------------------------------------------------------------- inputs
def ordinary_ids(shape: tuple[int, ...], generator) -> Any:
    return torch.randint(3, VOCAB, shape, generator=generator)


def chunked_document(length: int, num_images: int, media: int, eoc: int, generator) -> Any:
    """`length` token ids made of `num_images` chunks `<image> text ... <|endofchunk|>` (MMC4's layout)."""
    ids = ordinary_ids((length,), generator)
    bounds = [length * j // num_images for j in range(num_images + 1)]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        ids[start] = media
        ids[end - 1] = eoc
    return ids


def fixed_batch(media: int, eoc: int, batch: int, length: int, num_images: int, seed: int):
    """(input_ids, attention_mask, images): `batch` documents of `length` tokens and `num_images` images each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([chunked_document(length, num_images, media, eoc, g) for _ in range(batch)])
    images = torch.randn(batch, num_images, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return ids, torch.ones_like(ids), images


def mmc4_like_documents(count: int, max_tokens: int, media: int, eoc: int, seed: int):
    """[(input_ids, images (k, 3, H, W))]: log-normal lengths (median 256, sigma 0.75: p99 ~1460) capped at
    max_tokens, 1-6 images each (at least 16 tokens per chunk)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.empty(count).log_normal_(mean=float(torch.tensor(256.0).log()), std=0.75, generator=g)
    documents = []
    for length in lengths.round().clamp(64, max_tokens).long().tolist():
        num_images = min(int(torch.randint(1, 7, (1,), generator=g)), length // 16)
        ids = chunked_document(length, num_images, media, eoc, g)
        documents.append((ids, torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)))
    return documents


def openflamingo_labels(ids, media: int, eoc: int, pad: int):
    """OpenFlamingo's MMC4 labels (train_utils.py): -100 on padding, on <image>, on every token before the first
    <image>, and on the tokens after an <|endofchunk|> up to the next <image>."""
    positions = torch.arange(ids.shape[-1]).expand_as(ids)
    none = torch.full_like(ids, -1)
    last_media = torch.where(ids == media, positions, none).cummax(-1).values
    last_eoc = torch.where(ids == eoc, positions, none).cummax(-1).values
    # shifted by one: the <|endofchunk|> itself is a label
    last_eoc_before = torch.cat([none[..., :1], last_eoc[..., :-1]], dim=-1)
    masked = (ids == pad) | (ids == media) | (last_media < 0) | (last_eoc_before > last_media)
    return ids.masked_fill(masked, -100)


def generation_prompts(media: int):
    g = torch.Generator().manual_seed(1)
    ids = ordinary_ids((GEN["batch"], GEN["prompt"]), g)
    ids[:, 0] = media
    images = torch.randn(GEN["batch"], 1, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return ids, torch.ones_like(ids), images


# ----------------------------------------------------------------------------------------------- assets
def make_assets(assets: Path) -> None:
    """Word-level tokenizer + random Llama LM (seed 0) + the peer's open_clip ViT config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(len(specials), VOCAB)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=2048,
    ).save_pretrained(assets / "lm")
    config = LlamaConfig(
        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-5, **LM
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(assets / "lm", safe_serialization=True)
    # open_clip model config: our ViT's shape; a 1-layer text tower, which OpenFlamingo drops anyway.
    vision_cfg = {
        "image_size": IMAGE_SIZE,
        "layers": VIT["num_hidden_layers"],
        "width": VIT["hidden_size"],
        "head_width": VIT["hidden_size"] // VIT["num_attention_heads"],
        "patch_size": VIT["patch_size"],
        "mlp_ratio": VIT["intermediate_size"] / VIT["hidden_size"],
    }
    text_cfg = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    (assets / "peer-vit-b-32.json").write_text(
        json.dumps({"embed_dim": 32, "quick_gelu": True, "vision_cfg": vision_cfg, "text_cfg": text_cfg})
    )


# ----------------------------------------------------------------------------------------------- ours
class Ours:
    name = "ours"
    images_key = "images"  # in a batch dict

    def __init__(self, assets: Path):
        from openflamingo import (
            CrossAttentionConfig,
            FlamingoConfig,
            PerceiverConfig,
            VisionConfig,
            build_flamingo,
        )

        config = FlamingoConfig(
            language_model=str(assets / "lm"),
            vision=VisionConfig("hf_clip", config=dict(VIT, image_size=IMAGE_SIZE, hidden_act="quick_gelu")),
            perceiver=PerceiverConfig(**PERCEIVER),
            cross_attention=CrossAttentionConfig(every_n_layers=EVERY),
        )
        self.model = build_flamingo(config, seed=0)
        ids = self.model.special_ids
        self.media, self.eoc, self.pad = ids.media, ids.end_of_chunk, ids.pad
        self.optimizer = None

    def prepare_train(self) -> None:
        from openflamingo.train.config import TrainConfig
        from openflamingo.train.optim import build_optimizer

        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, TrainConfig(lr=1e-4))

    def padded_batch(self, ids, attention_mask, images) -> dict:
        labels = openflamingo_labels(ids, self.media, self.eoc, self.pad)
        return dict(input_ids=ids, attention_mask=attention_mask, images=images, labels=labels)

    def packed_batches(self, documents, row_tokens: int, cached: bool = False) -> list[dict]:
        """Documents packed into PACK_ROWS rows of `row_tokens` per step, as the training data loader does.
        `cached`: the documents' "images" are the frozen encoder's tokens, as a feature cache gives them."""
        from openflamingo.data.batching import PIXELS, Batcher, MediaLayout, PackingConfig, PreparedSample

        encoder = self.model.vision_encoder
        media = MediaLayout("image_features", (encoder.num_tokens, encoder.dim)) if cached else PIXELS
        batcher = Batcher(PACK_ROWS, self.pad, PackingConfig(row_tokens=row_tokens), media)
        for ids, images in documents:
            labels = openflamingo_labels(ids, self.media, self.eoc, self.pad)
            batcher.add(PreparedSample(ids.tolist(), labels.tolist(), list(images)))
        batches = []
        while (batch := batcher.pop_batch()) is not None:
            batches.append(batch)
        return batches

    def prepare(self, batch: dict) -> dict:
        """What the training loop's prefetch thread does to each batch before the step (checks, logit positions)."""
        from openflamingo.train.prefetch import prepare_batch

        return prepare_batch(self.model, batch)

    def train_step(self, prepared: dict) -> float:
        """What openflamingo.train.loop does per optimizer step of one micro-batch (fp32, no autocast)."""
        from openflamingo.train.loop import forward_backward

        loss_tokens = float(prepared["loss_tokens"])
        loss_sum = forward_backward(self.model, prepared, 1.0 / loss_tokens, torch.device("cpu"), None)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum) / loss_tokens

    def generate(self, ids, attention_mask, images):
        self.model.eval()
        return self.model.generate(
            input_ids=ids,
            images=images,
            attention_mask=attention_mask,
            max_new_tokens=GEN["new"],
            min_new_tokens=GEN["new"],
            do_sample=False,
            num_beams=1,
        )


# ----------------------------------------------------------------------------------------------- peer
_KEEP_ALIVE: list = []


def peer_torchvision_workaround() -> None:
    """The peer venv's torchvision 0.28 wheel is a CUDA build: its ops library cannot load beside CPU torch, and
    `import torchvision` then fails only where it registers fake kernels for two of those ops (nms, qnms). Declaring
    their schemas without kernels lets the import succeed; open_clip and open_flamingo never call them."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    try:
        for library in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
            torch.ops.load_library(library)
        return
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        library.define(schema)
    _KEEP_ALIVE.append(library)  # a dropped Library drops its schemas


class Peer:
    name = "open_flamingo"
    images_key = "vision_x"

    def __init__(self, assets: Path):
        import open_clip
        from open_flamingo import create_model_and_transforms

        open_clip.add_model_config(str(assets / "peer-vit-b-32.json"))
        torch.manual_seed(0)
        self.model, _, tokenizer = create_model_and_transforms(
            clip_vision_encoder_path="peer-vit-b-32",
            clip_vision_encoder_pretrained=None,
            lang_encoder_path=str(assets / "lm"),
            tokenizer_path=str(assets / "lm"),
            cross_attn_every_n_layers=EVERY,
            use_local_files=True,
        )
        self.media, self.eoc, self.pad = (
            self.model.media_token_id,
            self.model.eoc_token_id,
            tokenizer.pad_token_id,
        )

    def prepare_train(self) -> None:
        """open_flamingo/train/train.py without FSDP: AdamW, weight decay only on gated_cross_attn parameters."""
        self.model.train()
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if "gated_cross_attn" in name else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4
        )

    def padded_batch(self, ids, attention_mask, images) -> dict:
        labels = openflamingo_labels(ids, self.media, self.eoc, self.pad)
        return dict(lang_x=ids, attention_mask=attention_mask, vision_x=images, labels=labels)

    def packed_batches(self, documents, row_tokens: int) -> list[dict]:
        """PACK_ROWS documents per step in order, right-padded to the longest, images zero-padded to the most."""
        batches = []
        for i in range(0, len(documents), PACK_ROWS):
            group = documents[i : i + PACK_ROWS]
            length = max(len(ids) for ids, _ in group)
            most = max(len(images) for _, images in group)
            ids = torch.full((len(group), length), self.pad, dtype=torch.long)
            attention_mask = torch.zeros_like(ids)
            images = torch.zeros(len(group), most, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
            for b, (doc_ids, doc_images) in enumerate(group):
                ids[b, : len(doc_ids)] = doc_ids
                attention_mask[b, : len(doc_ids)] = 1
                images[b, : len(doc_images), 0] = doc_images
            batches.append(self.padded_batch(ids, attention_mask, images))
        return batches

    def prepare(self, batch: dict) -> dict:
        return batch  # its labels were made with the batch; nothing else happens before its step

    def train_step(self, batch: dict) -> float:
        """open_flamingo/train/train_utils.py per batch, fp32, no accumulation."""
        loss = self.model(**batch)[0]
        loss.backward()
        embedding = self.model.lang_encoder.get_input_embeddings().weight
        if embedding.grad is not None:  # only the <image> and <|endofchunk|> rows learn
            keep = torch.zeros_like(embedding.grad)
            keep[self.media] = 1
            keep[self.eoc] = 1
            embedding.grad = embedding.grad * keep
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def generate(self, ids, attention_mask, images):
        self.model.eval()
        with torch.no_grad():
            return self.model.generate(
                images,
                ids,
                attention_mask,
                max_new_tokens=GEN["new"],
                min_new_tokens=GEN["new"],
                num_beams=1,
                do_sample=False,
                pad_token_id=self.pad,
            )


# ----------------------------------------------------------------------------------------------- child
def timed(fn: Callable[[], Any], warmup: int, n: int, around: ContextManager) -> tuple[list[float], float]:
    """Times of n runs after `warmup` untimed ones (the n runs inside `around`), and the foreign load meanwhile."""
    for _ in range(warmup):
        fn()
    load = ForeignLoad()
    times = []
    with around:
        load.start()
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        foreign = load.stop()
    return times, foreign


def measure(impl: Ours | Peer, what: str, args: argparse.Namespace, around: ContextManager) -> dict:
    """One measurement; `around` wraps its timed part (a profiler, or nothing)."""
    if what == "generate":
        ids, attention_mask, images = generation_prompts(impl.media)
        outputs = []
        times, foreign = timed(
            lambda: outputs.append(impl.generate(ids, attention_mask, images)), 1, args.n_gen, around
        )
        new_tokens = GEN["batch"] * (outputs[-1].shape[1] - ids.shape[1])
        median = statistics.median(times)
        return dict(
            median_s=median,
            times_s=times,
            new_tokens=new_tokens,
            rate=new_tokens / median,
            unit=UNITS[what],
            foreign_cores=foreign,
        )

    impl.prepare_train()
    fixed = impl.prepare(
        impl.padded_batch(
            *fixed_batch(impl.media, impl.eoc, TRAIN["batch"], TRAIN["seq"], TRAIN["images"], seed=0)
        )
    )
    if what == "train":
        losses = []
        times, foreign = timed(lambda: losses.append(impl.train_step(fixed)), args.warmup, args.n, around)
        median = statistics.median(times)
        tokens = TRAIN["batch"] * TRAIN["seq"]
        return dict(
            median_s=median,
            times_s=times,
            rate=tokens / median,
            unit=UNITS[what],
            losses=losses,
            foreign_cores=foreign,
        )

    documents = mmc4_like_documents(args.docs, args.max_doc_tokens, impl.media, impl.eoc, seed=2)
    encode_s = None
    if what == "packed-cached":  # what building the feature cache does once, before any epoch
        start = time.perf_counter()
        with torch.no_grad():
            documents = [(ids, impl.model.vision_encoder(images)) for ids, images in documents]
        encode_s = time.perf_counter() - start
    if encode_s is None:
        batches = impl.packed_batches(documents, args.max_doc_tokens)
    else:
        batches = impl.packed_batches(documents, args.max_doc_tokens, cached=True)
    useful = sum(len(ids) for ids, _ in documents)
    positions = sum(b["attention_mask"].numel() for b in batches)
    images = sum(len(doc_images) for _, doc_images in documents)
    key = "image_features" if encode_s is not None else impl.images_key
    image_slots = sum(b[key].shape[:2].numel() for b in batches)  # incl. zero-padding slots
    prepared = [impl.prepare(b) for b in batches]  # the loop prepares batches on its prefetch thread
    impl.train_step(fixed)  # warm-up: allocates the optimizer state
    losses = []

    def epoch() -> None:
        for batch in prepared:
            losses.append(impl.train_step(batch))

    times, foreign = timed(epoch, 0, 1, around)
    return dict(
        median_s=times[0],
        encode_s=encode_s,
        images=images,
        image_slots=image_slots,
        rate=useful / times[0],
        unit=UNITS[what],
        documents=len(documents),
        useful_tokens=useful,
        positions=positions,
        padding_fraction=1 - useful / positions,
        steps=len(batches),
        losses=losses,
        foreign_cores=foreign,
    )


def child(args: argparse.Namespace) -> None:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    assets = Path(args.assets)
    if args.child_impl == "peer":
        peer_torchvision_workaround()  # before transformers or open_clip import torchvision
    if args.child_what == "assets":
        make_assets(assets)
        print(MARK + json.dumps({"what": "assets"}), flush=True)
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    impl = Ours(assets) if args.child_impl == "ours" else Peer(assets)
    build_s = time.perf_counter() - start
    if args.profile:
        profile(impl, args)
        return
    result = measure(impl, args.child_what, args, contextlib.nullcontext())
    params = list(impl.model.parameters())
    record = dict(
        impl=impl.name,
        what=args.child_what,
        **result,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        build_s=build_s,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    print(MARK + json.dumps(record), flush=True)


def profile(impl: Ours | Peer, args: argparse.Namespace) -> None:
    """torch.profiler over the timed part of one measurement (one step / call): the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    args.n, args.n_gen = 1, 1
    prof = torch_profile(activities=[ProfilerActivity.CPU], record_shapes=args.profile_shapes)
    result = measure(impl, args.child_what, args, prof)
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "times_s")}))
    print(
        prof.key_averages(group_by_input_shape=args.profile_shapes).table(
            sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_name_column_width=60
        )
    )


# ----------------------------------------------------------------------------------------------- parent
def run_child(python: str, impl: str, what: str, args: argparse.Namespace) -> dict:
    command = [
        python,
        str(Path(__file__).resolve()),
        "--child",
        impl,
        what,
        "--assets",
        args.assets,
        "--threads",
        str(args.threads),
        "--warmup",
        str(args.warmup),
        "--n",
        str(args.n),
        "--n-gen",
        str(args.n_gen),
        "--docs",
        str(args.docs),
        "--max-doc-tokens",
        str(args.max_doc_tokens),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line[len(MARK) :] for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{impl} {what} failed (rc={done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def machine_info() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])

    def git(*command: str) -> str:
        repo = Path(__file__).resolve().parent
        return subprocess.run(["git", *command], capture_output=True, text=True, cwd=repo).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if git("status", "--porcelain", "--", "../src"):  # what ran is the working tree, not the commit
        commit += " + uncommitted changes in src/"
    return dict(
        what="machine",
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        cpu=cpu,
        cores=os.cpu_count(),
        memory_gb=round(memory_kb / 2**20, 1),
        commit=commit,
        python=platform.python_version(),
    )


def summary(records: list[dict]) -> str:
    """Markdown table: medians over rounds, ours / the peer's median, and the ratio within each round."""

    def per_round(impl: str, what: str, key: str) -> dict[int, float]:
        return {
            r["round"]: r[key]
            for r in records
            if r.get("impl") == impl and r.get("what") == what and not r.get("discarded")
        }

    def listed(values, digits: int) -> str:
        return ", ".join(f"{x:.{digits}f}" for x in values)

    lines = [
        "| measurement | ours: median (rounds) | OpenFlamingo 2.0.1: median (rounds) | ours / peer: median "
        "(rounds) | foreign cores (ours; peer) |",
        "|---|---|---|---|---|",
    ]
    rows = [(what, "rate", f"{what} ({unit})", 1) for what, unit in UNITS.items()]
    rows.append(("train", "peak_rss_mb", "train child peak RSS (MB)", 0))
    for what, key, label, digits in rows:
        ours = per_round("ours", what, key)
        peer = per_round("open_flamingo", OURS_ONLY.get(what, what), key)
        rounds = sorted(ours.keys() & peer.keys())
        if not rounds:
            continue
        ours_median, peer_median = statistics.median(ours.values()), statistics.median(peer.values())
        load = [
            per_round("ours", what, "foreign_cores"),
            per_round("open_flamingo", OURS_ONLY.get(what, what), "foreign_cores"),
        ]
        lines.append(
            f"| {label} | **{ours_median:.{digits}f}** ({listed(ours.values(), digits)}) "
            f"| **{peer_median:.{digits}f}** ({listed(peer.values(), digits)}) "
            f"| **{ours_median / peer_median:.2f}x** ({listed([ours[r] / peer[r] for r in rounds], 2)}) "
            f"| {listed(load[0].values(), 2)}; {listed(load[1].values(), 2)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--peer-python", help="python of a venv with open-flamingo 2.0.1 (e.g. /tmp/peer-venv)"
    )
    parser.add_argument(
        "--assets", default="/tmp/bench-train-assets", help="tokenizer + random LM (made once)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--what", nargs="+", default=list(MEASUREMENTS), choices=MEASUREMENTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps before the timed ones")
    parser.add_argument("--n", type=int, default=3, help="timed train steps per child")
    parser.add_argument("--n-gen", type=int, default=3, help="timed generate calls per child")
    parser.add_argument("--docs", type=int, default=12, help="packed: documents in the epoch")
    parser.add_argument(
        "--max-doc-tokens", type=int, default=1024, help="packed: length cap = packed row length"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each child, wait up to this long for other processes to use < 0.2 cores",
    )
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.3,
        help="rerun a measurement taken while others used more cores",
    )
    parser.add_argument("--retries", type=int, default=1, help="reruns of a measurement taken under load")
    parser.add_argument("--out", help="also write the JSON lines here")
    parser.add_argument("--summarize", metavar="JSONL", help="only print the table of a saved --out file")
    parser.add_argument("--profile", choices=MEASUREMENTS, help="profile ours on this measurement and stop")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--profile-shapes", action="store_true", help="group the profile by input shapes")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.child_impl, args.child_what = args.child
        child(args)
        return
    if args.summarize:
        print(summary([json.loads(line) for line in Path(args.summarize).read_text().splitlines()]))
        return
    if args.profile:
        args.child_impl, args.child_what = "ours", args.profile
        child(args)
        return
    if not args.peer_python:
        parser.error("--peer-python is required (or --profile)")
    records = [machine_info()]
    out = open(args.out, "w") if args.out else None

    def emit(record: dict) -> None:
        records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            print(line, file=out, flush=True)

    emit(records.pop())
    if not (Path(args.assets) / "lm" / "config.json").exists():
        Path(args.assets).mkdir(parents=True, exist_ok=True)
        run_child(args.peer_python, "peer", "assets", args)
    for round_ in range(1, args.rounds + 1):
        for what in args.what:
            pairs = (("ours", sys.executable), ("peer", args.peer_python))
            for impl, python in pairs[:1] if what in OURS_ONLY else pairs:
                # Two torch threads on two cores: one core taken by another job slows a step several-fold, so a
                # measurement taken under load is rerun (up to --retries times); the last attempt counts.
                for attempt in range(args.retries + 1):
                    quiet = wait_quiet(args.wait_quiet)
                    record = dict(
                        run_child(python, impl, what, args), round=round_, foreign_cores_before=quiet
                    )
                    if record["foreign_cores"] <= args.max_foreign or attempt == args.retries:
                        break
                    emit(dict(record, discarded=True))
                emit(dict(record, attempt=attempt + 1))
    print(summary(records), flush=True)
    if out:
        out.close()


if __name__ == "__main__":
    main()
