"""Converters from public data formats to this project's shards: `convert(FORMAT, ...)` or `openflamingo data convert`."""

from __future__ import annotations

from pathlib import Path

from ...errors import ExistingFileError, InputError, MissingFileError
from .annotations import VQA_PROMPT, caption_samples, nlvr2_samples, vqa_samples
from .common import ConversionReport, write_samples
from .easy_vqa import easy_vqa_samples, easy_vqa_shards
from .img2dataset import img2dataset_samples
from .llava import llava_samples
from .mmc4 import DEFAULT_SIMILARITY_THRESHOLD, mmc4_samples
from .obelics import obelics_samples

FORMATS = {
    "img2dataset": "img2dataset output: a folder or pattern of tar shards, or its `files` folder",
    "mmc4": "MMC4 jsonl (+ --images DIR unless the lines carry image_base64)",
    "obelics": "OBELICS-style parquet files with texts/images lists",
    "captions": "jsonl or csv of image paths and captions (a folder of images + captions)",
    "vqa": "jsonl of image, question, answers",
    "nlvr2": "jsonl of two images, a sentence and a true/false label",
    "llava": "LLaVA instruction json/jsonl: image(s) + human/gpt conversations (answer-only loss)",
    "easy-vqa": "the easy-VQA package's data (--layout pairs|vqa|fewshot|chat, --split train|test)",
}


def convert(
    source_format: str,
    inputs: list[str],
    out: str | Path,
    images: str | Path | None = None,
    samples_per_shard: int = 1000,
    max_images: int = 6,
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
    layout: str = "vqa",
    split: str = "train",
    shots: int = 4,
    seed: int = 0,
    image_field: str = "image",
    caption_field: str = "caption",
    prompt: str = VQA_PROMPT,
) -> ConversionReport:
    """Write shards of `source_format` data from `inputs` into the folder `out`; returns what was written/skipped."""
    if source_format not in FORMATS:
        raise InputError(f"unknown source format {source_format!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise ExistingFileError(f"{out} already holds shards; choose an empty or new folder")
    images_dir = Path(images) if images is not None else None
    if images_dir is not None and not images_dir.is_dir():
        raise MissingFileError(f"image folder {images_dir} does not exist")
    if source_format == "easy-vqa":
        if inputs:
            raise InputError("easy-vqa reads the installed easy-vqa package; give no input files")
    elif not inputs:
        raise InputError(f"--from {source_format} needs at least one input")
    paths = [Path(p) for p in inputs]
    if source_format not in ("img2dataset", "easy-vqa"):
        for path in paths:
            if not path.is_file():
                raise MissingFileError(f"input file {path} does not exist")
    report = ConversionReport()
    if source_format == "img2dataset":
        samples = (s for source in inputs for s in img2dataset_samples(source, report))
    elif source_format == "mmc4":
        samples = (
            s for p in paths for s in mmc4_samples(p, report, images_dir, similarity_threshold, max_images)
        )
    elif source_format == "obelics":
        samples = obelics_samples(paths, report, images_dir, max_images)
    elif source_format == "captions":
        samples = (
            s for p in paths for s in caption_samples(p, report, images_dir, image_field, caption_field)
        )
    elif source_format == "vqa":
        samples = (s for p in paths for s in vqa_samples(p, report, images_dir, prompt))
    elif source_format == "llava":
        samples = (s for p in paths for s in llava_samples(p, report, images_dir))
    elif source_format == "nlvr2":
        samples = (s for p in paths for s in nlvr2_samples(p, report, images_dir))
    else:
        samples = easy_vqa_samples(layout, report, split, shots, seed, prompt)
    write_samples(samples, out, report, samples_per_shard)
    return report


__all__ = ["FORMATS", "ConversionReport", "convert", "easy_vqa_shards"]
