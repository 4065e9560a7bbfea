"""What every converter shares: image bytes with the right extension, splitting long documents, a report."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..samples import (
    EMPTY_IMAGE,
    UNDECODABLE_IMAGE,
    BadSample,
    ImageItem,
    InterleavedDocument,
    Sample,
    TextItem,
)
from ..shards import ShardWriter

# PIL format -> shard extension; other formats are re-encoded as PNG so every loader can read them.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MISSING_IMAGE = "missing_image"  # a converter-only reason: the source names an image file that is not there


@dataclass
class ConversionReport:
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)  # e.g. images dropped below the similarity threshold

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def note(self, what: str, count: int = 1) -> None:
        if count:
            self.notes[what] = self.notes.get(what, 0) + count

    def to_dict(self) -> dict:
        return {"samples": self.samples, "skipped": self.skipped, "notes": self.notes, "shards": self.shards}


def image_item(data: bytes, name: str) -> ImageItem:
    """Image bytes as stored in a shard: JPEG/PNG/WebP kept byte for byte, anything else re-encoded as PNG."""
    if not data:
        raise BadSample(EMPTY_IMAGE, f"image {name} is 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            extension = KEPT_FORMATS.get(image.format or "")
            if extension is None:
                buffer = io.BytesIO()
                image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, "PNG")
                data, extension = buffer.getvalue(), "png"
    except Exception as error:  # any PIL failure on foreign bytes means "not an image we can use"
        raise BadSample(UNDECODABLE_IMAGE, f"image {name}: {type(error).__name__}: {error}") from None
    return ImageItem(data, extension)


def image_file(directory: Path, relative: str) -> ImageItem:
    path = directory / relative
    if not path.is_file():
        raise BadSample(MISSING_IMAGE, f"image file {path} does not exist")
    return image_item(path.read_bytes(), str(path))


def image_base64(text: str, name: str) -> ImageItem:
    try:
        return image_item(base64.b64decode(text, validate=False), name)
    except (binascii.Error, ValueError) as error:
        raise BadSample(UNDECODABLE_IMAGE, f"image {name}: bad base64 ({error})") from None


def split_by_images(
    key: str, items: list[TextItem | ImageItem], max_images: int, metadata: dict | None = None
) -> list[InterleavedDocument]:
    """A document with more than `max_images` images becomes several documents of at most `max_images` each.

    A new document starts at an image, so each image keeps the text that follows it; text before the first image
    stays with the first document. Nothing is discarded.
    """
    parts: list[list[TextItem | ImageItem]] = [[]]
    images_in_part = 0
    for item in items:
        if isinstance(item, ImageItem):
            if images_in_part == max_images:
                parts.append([])
                images_in_part = 0
            images_in_part += 1
        parts[-1].append(item)
    if len(parts) == 1:
        return [InterleavedDocument(key, parts[0], metadata or {})]
    return [InterleavedDocument(f"{key}_{i}", part, metadata or {}) for i, part in enumerate(parts)]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict | None]]:
    """(line number, object) per non-empty line; None for a line that is not a JSON object."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            yield number, value if isinstance(value, dict) else None


def write_samples(
    samples: Iterable[Sample], out: Path, report: ConversionReport, samples_per_shard: int
) -> None:
    """Validate and write; invalid samples are counted in the report, not written."""
    with ShardWriter(out, samples_per_shard=samples_per_shard) as writer:
        for sample in samples:
            try:
                sample.validate()
            except BadSample as bad:
                report.skip(bad.reason)
                continue
            # Source keys can repeat across input files: shard keys are running numbers, the source key is kept.
            sample.metadata = {**sample.metadata, "source_key": sample.key}
            sample.key = f"{report.samples:09d}"
            writer.write(sample)
            report.samples += 1
    report.shards = [str(path) for path in writer.shards]
