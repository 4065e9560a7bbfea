"""OBELICS-style parquet rows -> interleaved documents.

Each row has two equally long lists, `texts` and `images`; at each position exactly one is set (reading order).
An image is bytes, a `{"bytes": ..., "path": ...}` struct (the Hugging Face Image feature), or a path relative to
`--images`. URLs are not downloaded (no network in the converter: fetch them first, e.g. with img2dataset).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ...errors import InputError, MissingDependencyError, MissingFileError
from ..samples import MISSING_FIELD, BadSample, ImageItem, TextItem
from .common import MISSING_IMAGE, ConversionReport, image_file, image_item, split_by_images

NOT_DOWNLOADED = "image_not_downloaded"


def _image(value, images_dir: Path | None, name: str) -> ImageItem:
    if isinstance(value, dict):
        if value.get("bytes"):
            return image_item(value["bytes"], name)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return image_item(bytes(value), name)
    if isinstance(value, str):
        if value.startswith(("http://", "https://")):
            raise BadSample(NOT_DOWNLOADED, f"{name} is a URL ({value}); download the images first")
        if images_dir is None:
            raise BadSample(MISSING_IMAGE, f"{name} is a path ({value}) but no --images directory was given")
        return image_file(images_dir, value)
    raise BadSample(MISSING_FIELD, f"{name} has no bytes, struct or path")


def obelics_document(row: dict, key: str, images_dir: Path | None, max_images: int):
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise BadSample(MISSING_FIELD, f"row {key}: needs equally long lists 'texts' and 'images'")
    items: list[TextItem | ImageItem] = []
    for position, (text, image) in enumerate(zip(texts, images, strict=True)):
        if image is not None:
            items.append(_image(image, images_dir, f"row {key} image {position}"))
        elif isinstance(text, str):
            items.append(TextItem(text))
    return split_by_images(key, items, max_images)


def obelics_samples(
    paths: list[Path], report: ConversionReport, images_dir: Path | None = None, max_images: int = 6
) -> Iterator:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("reading parquet needs pyarrow: pip install pyarrow") from None
    for file_index, path in enumerate(paths):
        if not path.is_file():
            raise MissingFileError(f"parquet file {path} does not exist")
        parquet = pq.ParquetFile(path)
        missing = {"texts", "images"} - set(parquet.schema_arrow.names)
        if missing:
            raise InputError(f"{path}: no column {sorted(missing)} (OBELICS rows need 'texts' and 'images')")
        row_number = 0
        for batch in parquet.iter_batches(batch_size=64, columns=["texts", "images"]):
            for row in batch.to_pylist():
                key = f"{file_index:04d}_{row_number:09d}"
                row_number += 1
                try:
                    documents = obelics_document(row, key, images_dir, max_images)
                except BadSample as bad:
                    report.skip(bad.reason)
                    continue
                report.note("documents_split", len(documents) - 1)
                yield from documents
