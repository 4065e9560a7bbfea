"""Data pipeline benchmark: prints JSON lines.

1. Decoded + preprocessed samples/s of ONE worker (the loader in the main process, num_workers=0), for image-text
   pairs and for MMC4-like interleaved documents (3 images each), at 224 px with CLIP's preprocessing. Two image
   sets: photos as img2dataset usually stores them (shorter side 256, JPEG) and the original photos (333-800 px).
   Each is measured with full-size JPEG decoding and with DCT-domain draft decoding (ImageLimits.draft_size=224).
2. The fraction of padding tokens that packing removes, on a length distribution like MMC4's (log-normal, median
   256 tokens, long tail, capped at 2048): padded batches of 8 samples vs rows of 2048 tokens, 4 rows per batch.

    .venv/bin/python bench/data.py [--tokenizer smollm2-135m] [--samples 1200]

The machine is shared (2 cores, other jobs): wall-clock rates vary from run to run, so the best of --repeats runs
and the rate per CPU second of the process (one worker = one core, torch threads = 1) are reported as well.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from openflamingo.data import (
    Batcher,
    DatasetConfig,
    FormatConfig,
    ImageItem,
    ImageLimits,
    ImageTextPair,
    InterleavedDocument,
    PackingConfig,
    ShardLoader,
    ShardWriter,
    TextItem,
)
from openflamingo.data.batching import PreparedSample
from openflamingo.data.cli import load_tokenizer
from openflamingo.model.vision import clip_preprocess

PHOTOS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "data"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def photo_set(shorter_side: int | None) -> list[bytes]:
    """The fixture photos as JPEG bytes, resized so the shorter side is `shorter_side` (None: original size)."""
    photos = []
    for path in sorted(PHOTOS.glob("*/images/**/*.*")):
        image = Image.open(path).convert("RGB")
        if shorter_side is not None:
            scale = shorter_side / min(image.size)
            image = image.resize(
                (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
            )
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        photos.append(buffer.getvalue())
    return photos


def write_pairs(directory: Path, photos: list[bytes], n: int) -> str:
    with ShardWriter(directory, samples_per_shard=500) as writer:
        for i in range(n):
            caption = f"a photo of item {i} in a sunny park with two people and a small dog"
            writer.write(ImageTextPair(f"{i:08d}", ImageItem(photos[i % len(photos)], "jpg"), caption))
    return str(directory)


def write_documents(directory: Path, photos: list[bytes], n: int) -> str:
    with ShardWriter(directory, samples_per_shard=200) as writer:
        for i in range(n):
            items: list[TextItem | ImageItem] = [TextItem("An article about a trip to the coast. " * 3)]
            for j in range(3):
                items += [
                    ImageItem(photos[(i + j) % len(photos)], "jpg"),
                    TextItem(f"Sentence {j} about the picture. " * 6),
                ]
            writer.write(InterleavedDocument(f"{i:08d}", items))
    return str(directory)


def throughput(
    shards: str, tokenizer, draft: int | None, batch_size: int, max_tokens: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Samples per wall-clock second, and per CPU second of this process (what one unshared core would do)."""
    preprocess = partial(clip_preprocess, size=224, mean=CLIP_MEAN, std=CLIP_STD)
    rates, cpu_rates = [], []
    for _ in range(repeats):
        config = DatasetConfig(
            shards,
            batch_size=batch_size,
            epochs=1,
            num_workers=0,
            shuffle_buffer=100,
            format=FormatConfig(max_tokens=max_tokens),
            images=ImageLimits(draft_size=draft),
        )
        loader = ShardLoader(config, tokenizer, preprocess)
        start, cpu_start, samples = time.perf_counter(), time.process_time(), 0
        for batch in loader:
            samples += batch["input_ids"].shape[0]
        rates.append(samples / (time.perf_counter() - start))
        cpu_rates.append(samples / (time.process_time() - cpu_start))
    return rates, cpu_rates


def padding_removed(samples: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    # log-normal: median exp(mu) = 256 tokens, sigma 0.75 gives a long tail (p99 ~ 1460), capped at 2048
    lengths = np.clip(np.round(rng.lognormal(np.log(256), 0.75, samples)), 16, 2048).astype(int)
    images = np.clip(lengths // 100, 1, 6)  # roughly one image per 100 tokens, as in MMC4 documents
    tokens = int(lengths.sum())

    def run(batcher: Batcher) -> int:
        padding = 0
        for n, k in zip(lengths, images, strict=True):
            batcher.add(PreparedSample([1] * int(n), [1] * int(n), [torch.zeros(3, 1, 1)] * int(k)))
            while batcher.ready():
                padding += _padding(batcher.pop_batch())
        while (batch := batcher.pop_batch()) is not None:
            padding += _padding(batch)
        return padding

    padded = run(Batcher(8, pad_id=0))
    packed = run(Batcher(4, pad_id=0, packing=PackingConfig(row_tokens=2048, max_images_per_row=48)))
    return {
        "bench": "packing_padding",
        "samples": samples,
        "median_tokens": float(np.median(lengths)),
        "p99_tokens": float(np.percentile(lengths, 99)),
        "padded_padding_fraction": round(padded / (tokens + padded), 4),
        "packed_padding_fraction": round(packed / (tokens + packed), 4),
        "padding_removed": round(1 - packed / padded, 4),
        "target_padding_removed": 0.9,
    }


def _padding(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].numel() - batch["attention_mask"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer folder or packaged LM name")
    parser.add_argument(
        "--samples", type=int, default=1200, help="pairs per throughput run (documents: a third)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker = one core
    tokenizer = load_tokenizer(args.tokenizer)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": 1,
        "note": "shared 2-core machine",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for photos_name, shorter in (("img2dataset_256px", 256), ("original_photos", None)):
            photos = photo_set(shorter)
            pairs = write_pairs(Path(tmp) / f"pairs-{photos_name}", photos, args.samples)
            documents = write_documents(Path(tmp) / f"docs-{photos_name}", photos, max(args.samples // 3, 1))
            for draft in (None, 224):
                for kind, shards, batch_size, max_tokens in (
                    ("pairs", pairs, 32, 64),
                    ("documents", documents, 8, 512),
                ):
                    rates, cpu_rates = throughput(
                        shards, tokenizer, draft, batch_size, max_tokens, args.repeats
                    )
                    line = {
                        "bench": f"{kind}_per_worker",
                        "images": photos_name,
                        "jpeg_draft_decoding": draft is not None,
                        "samples_per_s_median": round(float(np.median(rates)), 1),
                        "samples_per_s_best": round(max(rates), 1),
                        "samples_per_cpu_s_median": round(float(np.median(cpu_rates)), 1),
                        "image_size": 224,
                        **(
                            {"images_per_sample": 3} if kind == "documents" else {"target_samples_per_s": 200}
                        ),
                        **machine,
                    }
                    print(json.dumps(line), flush=True)
    print(json.dumps(padding_removed(20000)), flush=True)


if __name__ == "__main__":
    main()
