"""`openflamingo data convert | inspect`: argparse wiring; `register(subparsers)` adds the `data` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError, MissingFileError
from .convert import DEFAULT_SIMILARITY_THRESHOLD, FORMATS, VQA_PROMPT
from .convert.easy_vqa import LAYOUTS


def run_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    report = convert(
        args.source_format,
        args.inputs,
        args.out,
        images=args.images,
        samples_per_shard=args.samples_per_shard,
        max_images=args.max_images,
        similarity_threshold=args.similarity_threshold,
        layout=args.layout,
        split=args.split,
        shots=args.shots,
        seed=args.seed,
        image_field=args.image_field,
        caption_field=args.caption_field,
        prompt=args.prompt,
    )
    summary = report.to_dict()
    summary["shards"] = len(report.shards)
    print(json.dumps(summary))
    if report.samples == 0:
        raise InputError(
            f"no sample could be converted from {args.inputs or args.source_format}: {report.skipped}"
        )
    print(f"wrote {report.samples} samples in {len(report.shards)} shards to {args.out}")


def load_tokenizer(name_or_path: str):
    """A local HF tokenizer directory, or a packaged language model's name (e.g. smollm2-135m)."""
    from ..backbones import LANGUAGE_MODEL_NAMES, resolve_language_model
    from ..model.build import load_tokenizer as load_model_tokenizer

    path = (
        resolve_language_model(name_or_path) if name_or_path in LANGUAGE_MODEL_NAMES else Path(name_or_path)
    )
    if not path.is_dir():
        raise MissingFileError(f"tokenizer directory {path} does not exist")
    # as a model built on it sees it (a pad token only when the files name one)
    return load_model_tokenizer(path)


def run_inspect(args: argparse.Namespace) -> None:
    from .images import ImageLimits
    from .inspection import format_report, inspect_shards
    from .shards import check_local_shards, expand_shards
    from .text import FormatConfig, SampleFormatter

    check_local_shards(expand_shards(args.shards))
    formatter = None
    if args.tokenizer:
        config = FormatConfig(max_tokens=args.max_tokens, max_images=args.max_images)
        formatter = SampleFormatter(load_tokenizer(args.tokenizer), config)
    report = inspect_shards(args.shards, formatter, ImageLimits(), args.max_samples)
    print(json.dumps(report) if args.json else format_report(report))


def register(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser("data", help="convert data sets to shards and inspect shards")
    commands = data.add_subparsers(dest="data_command", required=True)

    convert = commands.add_parser(
        "convert",
        help="write tar shards from a public data format",
        description="Formats: " + "; ".join(f"{name}: {text}" for name, text in FORMATS.items()),
    )
    convert.add_argument("--from", dest="source_format", required=True, choices=sorted(FORMATS))
    convert.add_argument("inputs", nargs="*", help="input files (img2dataset: folders or shard patterns)")
    convert.add_argument("--out", type=Path, required=True, help="folder for the shards (new or empty)")
    convert.add_argument(
        "--images", type=Path, default=None, help="folder the inputs' image paths are relative to"
    )
    convert.add_argument("--samples-per-shard", type=int, default=1000)
    convert.add_argument(
        "--max-images", type=int, default=6, help="mmc4/obelics: documents with more images are split"
    )
    convert.add_argument(
        "--similarity-threshold",
        type=float,
        default=DEFAULT_SIMILARITY_THRESHOLD,
        help="mmc4: minimum image-sentence CLIP cosine similarity",
    )
    convert.add_argument("--layout", choices=LAYOUTS, default="vqa", help="easy-vqa")
    convert.add_argument("--split", choices=("train", "test"), default="train", help="easy-vqa")
    convert.add_argument(
        "--shots", type=int, default=4, help="easy-vqa fewshot: triples per document; chat: turns"
    )
    convert.add_argument("--seed", type=int, default=0, help="easy-vqa fewshot: grouping of questions")
    convert.add_argument("--image-field", default="image", help="captions: field/column of the image path")
    convert.add_argument(
        "--caption-field", default="caption", help="captions: field/column of the caption(s)"
    )
    convert.add_argument("--prompt", default=VQA_PROMPT, help="vqa/easy-vqa: question prompt with {question}")
    convert.set_defaults(run=run_convert)

    inspect = commands.add_parser("inspect", help="count samples, bad samples by reason, images, lengths")
    inspect.add_argument("shards", nargs="+", help="shard paths, brace patterns, folders or pipe: commands")
    inspect.add_argument("--json", action="store_true", help="one JSON object (samples, bad, ...)")
    inspect.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or packaged LM name: token lengths"
    )
    inspect.add_argument("--max-tokens", type=int, default=256, help="with --tokenizer: truncation length")
    inspect.add_argument("--max-images", type=int, default=6, help="with --tokenizer: images per sample")
    inspect.add_argument("--max-samples", type=int, default=None, help="stop after this many samples")
    inspect.set_defaults(run=run_inspect)
    return data
