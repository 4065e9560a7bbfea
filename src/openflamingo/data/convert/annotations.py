"""Annotation files next to images: captions (jsonl or csv), VQA (jsonl) and NLVR2 statements (jsonl).

Image paths in the files are relative to `images_dir` (default: the annotation file's folder), as in the
project's shared data sets.
- captions: `{"image", "caption"}` or `{"image", "captions": [...]}` (one pair per caption); csv with a header;
- VQA: `{"image", "question", "answers": [...]}` or `"answer"` -> `<image>Question: q Short answer: a`, the
  question not trained (loss=False), the most frequent answer trained;
- NLVR2: `{"images": [left, right], "sentence", "label"}` -> a two-image document ending in "true"/"false".
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..samples import MISSING_FIELD, BadSample, ImageItem, ImageTextPair, InterleavedDocument, TextItem
from .common import ConversionReport, image_file, read_jsonl

VQA_PROMPT = "Question: {question} Short answer:"  # OpenFlamingo's VQA prompt, spaced


def vqa_items(
    image: ImageItem, question: str, answer: str, prompt: str = VQA_PROMPT
) -> list[TextItem | ImageItem]:
    return [image, TextItem(prompt.format(question=question.strip()), loss=False), TextItem(answer.strip())]


def _rows(path: Path) -> Iterator[tuple[int, dict | None]]:
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", errors="replace", newline="") as file:
            yield from enumerate(csv.DictReader(file), start=2)
    else:
        yield from read_jsonl(path)


def _field(row: dict, names: tuple[str, ...], what: str, where: str):
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    raise BadSample(MISSING_FIELD, f"{where}: no {what} field (tried {', '.join(names)})")


def caption_samples(
    path: Path,
    report: ConversionReport,
    images_dir: Path | None = None,
    image_field: str = "image",
    caption_field: str = "caption",
) -> Iterator[ImageTextPair]:
    images_dir = images_dir or path.parent
    for number, row in _rows(path):
        where = f"{path}:{number}"
        try:
            if row is None:
                raise BadSample("invalid_json", f"{where}: not a JSON object")
            relative = _field(row, (image_field, "file", "file_name", "path"), "image", where)
            captions = _field(row, (caption_field, "captions", "text", "txt"), "caption", where)
            image = image_file(images_dir, str(relative))
        except BadSample as bad:
            report.skip(bad.reason)
            continue
        captions = captions if isinstance(captions, list) else [captions]
        for i, caption in enumerate(captions):
            key = f"{number:09d}" if len(captions) == 1 else f"{number:09d}_{i}"
            yield ImageTextPair(key, image, str(caption).strip(), {"image": str(relative)})


def vqa_samples(
    path: Path, report: ConversionReport, images_dir: Path | None = None, prompt: str = VQA_PROMPT
) -> Iterator[InterleavedDocument]:
    images_dir = images_dir or path.parent
    for number, row in _rows(path):
        where = f"{path}:{number}"
        try:
            if row is None:
                raise BadSample("invalid_json", f"{where}: not a JSON object")
            question = str(_field(row, ("question",), "question", where))
            answers = _field(row, ("answers", "answer"), "answer", where)
            answers = [str(a) for a in answers] if isinstance(answers, list) else [str(answers)]
            answer = Counter(answers).most_common(1)[0][0]  # ties: the first given
            image = image_file(images_dir, str(_field(row, ("image",), "image", where)))
        except BadSample as bad:
            report.skip(bad.reason)
            continue
        metadata = {"answers": answers, "image": row["image"]}
        yield InterleavedDocument(f"{number:09d}", vqa_items(image, question, answer, prompt), metadata)


def nlvr2_samples(
    path: Path, report: ConversionReport, images_dir: Path | None = None
) -> Iterator[InterleavedDocument]:
    images_dir = images_dir or path.parent
    for number, row in _rows(path):
        where = f"{path}:{number}"
        try:
            if row is None:
                raise BadSample("invalid_json", f"{where}: not a JSON object")
            paths = _field(row, ("images",), "images", where)
            if not isinstance(paths, list) or len(paths) != 2:
                raise BadSample(MISSING_FIELD, f"{where}: 'images' must list the left and right image")
            sentence = str(_field(row, ("sentence",), "sentence", where))
            label = row.get("label")
            if not isinstance(label, bool):
                raise BadSample(MISSING_FIELD, f"{where}: 'label' must be true or false")
            left, right = (image_file(images_dir, str(p)) for p in paths)
        except BadSample as bad:
            report.skip(bad.reason)
            continue
        items = [
            left,
            TextItem("Left image.", loss=False),
            right,
            TextItem(f"Right image. Statement: {sentence.strip()} True or false?", loss=False),
            TextItem("true" if label else "false"),
        ]
        yield InterleavedDocument(f"{number:09d}", items, {"images": paths})
