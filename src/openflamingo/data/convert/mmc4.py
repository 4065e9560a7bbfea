"""MMC4 jsonl -> interleaved documents.

An MMC4 line has `text_list` (sentences), `image_info` (one entry per image: `image_name`, optionally
`image_base64`) and `similarity_matrix` (images x sentences, CLIP ViT-L/14 cosine similarities). Each image is
placed before one sentence by a one-to-one assignment that maximises the total similarity (Hungarian algorithm; MMC4's
own `matched_text_index` is a per-image argmax, which can put two images on one sentence). Pairs below the
similarity threshold are dropped (0.24 is a cosine similarity; OpenFlamingo's example command passes 30, which no
cosine reaches). Images then appear in the order of their sentences, so the k-th `<image>` token always gets the
k-th image. Documents with more images than `max_images` are split into several documents, not truncated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import MissingDependencyError
from ..samples import IMAGE_COUNT_MISMATCH, MISSING_FIELD, NO_IMAGE, BadSample, ImageItem, TextItem
from .common import ConversionReport, image_base64, image_file, read_jsonl, split_by_images

DEFAULT_SIMILARITY_THRESHOLD = 0.24


def assign_images_to_sentences(similarity: np.ndarray, threshold: float) -> dict[int, int]:
    """image index -> sentence index: one-to-one, maximum total similarity, pairs below `threshold` dropped."""
    if similarity.size == 0:
        return {}
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise MissingDependencyError(
            "MMC4 conversion needs scipy for the assignment: pip install scipy"
        ) from None
    images, sentences = linear_sum_assignment(similarity, maximize=True)
    return {int(i): int(s) for i, s in zip(images, sentences, strict=True) if similarity[i, s] >= threshold}


def mmc4_document(
    line: dict, key: str, images_dir: Path | None, threshold: float, max_images: int, report: ConversionReport
):
    sentences = line.get("text_list")
    image_info = line.get("image_info")
    if not isinstance(sentences, list) or not isinstance(image_info, list) or "similarity_matrix" not in line:
        raise BadSample(MISSING_FIELD, f"MMC4 line {key}: needs text_list, image_info and similarity_matrix")
    if not image_info:
        raise BadSample(NO_IMAGE, f"MMC4 line {key}: image_info is empty")
    try:
        similarity = np.asarray(line["similarity_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        similarity = np.zeros(0)
    if similarity.shape != (len(image_info), len(sentences)):
        raise BadSample(
            IMAGE_COUNT_MISMATCH,
            f"MMC4 line {key}: similarity_matrix is {similarity.shape}, expected "
            f"({len(image_info)} images, {len(sentences)} sentences)",
        )
    loaded: dict[int, ImageItem] = {}
    for i, info in enumerate(image_info):
        try:
            if isinstance(info.get("image_base64"), str):
                loaded[i] = image_base64(info["image_base64"], f"{key} image {i}")
            elif images_dir is not None and isinstance(info.get("image_name"), str):
                loaded[i] = image_file(images_dir, info["image_name"])
            else:
                raise BadSample(
                    MISSING_FIELD, f"MMC4 line {key} image {i}: no image_base64 and no --images dir"
                )
        except BadSample as bad:
            report.note(f"image_{bad.reason}")
    available = sorted(loaded)
    assignment = assign_images_to_sentences(similarity[available], threshold)
    report.note("images_below_similarity_threshold", min(len(available), len(sentences)) - len(assignment))
    report.note("images_without_a_sentence", max(len(available) - len(sentences), 0))
    if not assignment:
        raise BadSample(
            NO_IMAGE, f"MMC4 line {key}: no image is left after assignment and threshold {threshold}"
        )
    image_at_sentence = {sentence: loaded[available[row]] for row, sentence in assignment.items()}
    items: list[TextItem | ImageItem] = []
    for s, sentence in enumerate(sentences):
        if s in image_at_sentence:
            items.append(image_at_sentence[s])
        items.append(TextItem(str(sentence)))
    metadata = {"url": line["url"]} if isinstance(line.get("url"), str) else {}
    return split_by_images(key, items, max_images, metadata)


def mmc4_samples(
    path: Path,
    report: ConversionReport,
    images_dir: Path | None = None,
    threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
    max_images: int = 6,
) -> Iterator:
    for number, line in read_jsonl(path):
        key = f"{number:09d}"
        if line is None:
            report.skip("invalid_json")
            continue
        try:
            documents = mmc4_document(line, key, images_dir, threshold, max_images, report)
        except BadSample as bad:
            report.skip(bad.reason)
            continue
        report.note("documents_split", len(documents) - 1)
        yield from documents
