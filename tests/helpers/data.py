"""Data builders: images, samples, shards, a tiny preprocess, the data CLI, the converters' fixtures and a chat
template."""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import torch
from PIL import Image

from openflamingo.data import (
    DatasetConfig,
    FormatConfig,
    ImageItem,
    ImageTextPair,
    InterleavedDocument,
    PackingConfig,
    ShardWriter,
    TextItem,
)
from openflamingo.data.cli import register
from openflamingo.model.vision import to_unit_tensor

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
IMAGE_SIZE = 16
SKIMAGE = FIXTURES / "skimage-clip-captions"
ALLENNLP = FIXTURES / "allennlp-vl-fixtures"
PHOTOS = {
    name: (SKIMAGE / "images" / name).read_bytes()
    for name in ("horse.png", "page.png", "moon.png", "rocket.jpg")
}
# A ChatML template, as SmolLM2-Instruct's (without its default system prompt).
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def image_bytes(seed: int, size: tuple[int, int] = (24, 20), fmt: str = "PNG") -> bytes:
    """A small image whose pixels encode `seed`, so batches can be told apart by their pixels."""
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


def preprocess(image: Image.Image) -> torch.Tensor:
    """A small stand-in for a vision encoder's preprocess: resize and scale to [0, 1]."""
    return to_unit_tensor(image.resize((IMAGE_SIZE, IMAGE_SIZE)))


def pair(i: int) -> ImageTextPair:
    return ImageTextPair(f"pair{i:04d}", ImageItem(image_bytes(i), "png"), f"a red cat number {i}")


def document(i: int, images: int = 2) -> InterleavedDocument:
    items: list[TextItem | ImageItem] = [TextItem(f"document {i} starts here")]
    for j in range(images):
        items += [
            ImageItem(image_bytes(1000 + 10 * i + j), f"{j}.png"),
            TextItem(f"the dog {j} sits " * (1 + i % 3)),
        ]
    return InterleavedDocument(f"doc{i:04d}", items)


def write_shards(directory: Path, samples, samples_per_shard: int) -> list[str]:
    with ShardWriter(directory, samples_per_shard=samples_per_shard) as writer:
        for sample in samples:
            writer.write(sample)
    return [str(path) for path in writer.shards]


def mixed_shards(directory: Path, pairs: int = 24, documents: int = 16, per_shard: int = 5) -> list[str]:
    samples = [pair(i) for i in range(pairs)] + [document(i, 1 + i % 3) for i in range(documents)]
    # interleave kinds so every shard has both
    order = sorted(range(len(samples)), key=lambda k: (k % 7, k))
    return write_shards(directory, [samples[k] for k in order], per_shard)


def mmc4_line(images: list[dict], sentences: list[str], similarity: list[list[float]]) -> str:
    return json.dumps(
        {
            "url": "https://example.org/page",
            "text_list": sentences,
            "image_info": images,
            "similarity_matrix": similarity,
        }
    )


def img2dataset_shard(path: Path, start: int) -> None:
    """Laid out as img2dataset writes webdataset output: KEY.jpg, KEY.txt, KEY.json per sample."""
    photo = (ALLENNLP / "images/flickr30k/4945942737.jpg").read_bytes()
    with tarfile.open(path, "w") as archive:
        for i in range(start, start + 3):
            meta = {
                "url": f"https://example.org/{i}.jpg",
                "caption": f"a girl by the water {i}",
                "status": "success",
            }
            for extension, data in (
                ("jpg", photo),
                ("txt", meta["caption"].encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{i:09d}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def cli(argv: list[str]) -> int:
    """Run `openflamingo data ...` the way openflamingo.cli.main does, through register()."""
    parser = argparse.ArgumentParser(prog="openflamingo")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"openflamingo {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def loader_config(shards: str, packed: bool = False, **overrides) -> DatasetConfig:
    """A small dataset of `shards` for the loader tests: padded, or packed into rows of 160 tokens."""
    settings = dict(
        shards=shards,
        batch_size=3,
        shuffle_buffer=6,
        num_workers=2,
        seed=7,
        format=FormatConfig(max_tokens=128),
        packing=PackingConfig(row_tokens=160, max_images_per_row=8, pool_rows=1.5) if packed else None,
    )
    settings.update(overrides)
    return DatasetConfig(**settings)
