"""LLaVA's instruction format -> conversation samples (answer-only loss once rendered in the model's format).

A record is `{"id", "image": "path" | "images": [...], "conversations": [{"from": "human" | "gpt" | "system",
"value": "...<image>..."}]}`, in a JSON array (LLaVA's released files) or one per line (jsonl). Image paths are
relative to `--images` (default: the file's folder). As in LLaVA, a record whose turns hold no `<image>` marker gets
its images at the start of the first human turn; any other marker count that differs from the image count is a bad
record, as are records without an assistant turn, with an unknown role, or naming a missing image file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ...errors import InputError
from ..samples import BAD_ROLE, INVALID_JSON, MISSING_FIELD, NO_IMAGE, BadSample, Conversation, Turn
from .common import ConversionReport, image_file, read_jsonl

MEDIA = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _records(path: Path) -> Iterator[tuple[str, dict | None]]:
    with open(path, encoding="utf-8", errors="replace") as file:
        head = file.read(4096).lstrip()
    if head.startswith("["):
        try:
            records = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: not valid JSON ({error})") from None
        for index, record in enumerate(records):
            yield f"{path}[{index}]", record if isinstance(record, dict) else None
    else:
        for number, record in read_jsonl(path):
            yield f"{path}:{number}", record


def _image_paths(record: dict, where: str) -> list[str]:
    value = record.get("images", record.get("image"))
    if value is None or value == []:
        raise BadSample(NO_IMAGE, f"{where}: no image (text-only records are not converted)")
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise BadSample(MISSING_FIELD, f"{where}: 'image'/'images' must be a path or a list of paths")
    return paths


def _turns(record: dict, images: int, where: str) -> list[Turn]:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadSample(MISSING_FIELD, f"{where}: no 'conversations' list")
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise BadSample(MISSING_FIELD, f"{where}: conversations[{i}] needs 'from' and a 'value' string")
        role = ROLES.get(str(message.get("from", "")).lower())
        if role is None:
            raise BadSample(BAD_ROLE, f"{where}: conversations[{i}] is from {message.get('from')!r}")
        turns.append(Turn(role, message["value"]))
    if not any(MEDIA in turn.text for turn in turns):
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is not None:
            first_user.text = MEDIA * images + "\n" + first_user.text
    return turns


def llava_samples(
    path: Path, report: ConversionReport, images_dir: Path | None = None
) -> Iterator[Conversation]:
    images_dir = images_dir or path.parent
    for where, record in _records(path):
        try:
            if record is None:
                raise BadSample(INVALID_JSON, f"{where}: not a JSON object")
            paths = _image_paths(record, where)
            turns = _turns(record, len(paths), where)
            images = [image_file(images_dir, p) for p in paths]
        except BadSample as bad:
            report.skip(bad.reason)
            continue
        yield Conversation(str(record.get("id", where)), turns, images)
