"""The two sample types, their WebDataset members, and validation with named skip reasons.

A shard sample is a group of tar members sharing a key (`KEY.EXT`, split at the first dot of the file name, as
WebDataset does). Two layouts:

- image-text pair (img2dataset's output, readable as is): `KEY.jpg|jpeg|png|webp` + `KEY.txt` (+ `KEY.json`);
- interleaved document: `KEY.doc.json` = `{"items": [{"text": ...}, {"image": "0.jpg"}, ...]}` in reading order,
  each image item naming its member `KEY.0.jpg`; a text item with `"loss": false` is context the model reads but is
  not trained to produce (a VQA question, a few-shot prompt);
- conversation: `KEY.conv.json` = `{"messages": [{"role": "user", "text": "<image>What is this?"}, {"role":
  "assistant", "text": "A cat."}, ...], "images": ["0.jpg", ...]}`, one `<image>` marker per image in order. It is
  rendered in the model's prompt format when loaded (plain Flamingo text or the LM's chat template), and only the
  assistant turns are trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SPECIAL_TOKEN_STRINGS = ("<image>", "<|endofchunk|>")

# Why a sample or a shard was skipped; `data inspect` and the loader count these by name.
TRUNCATED_TAR = "truncated_tar"
UNREADABLE_SHARD = "unreadable_shard"
MISSING_FIELD = "missing_field"
INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
EMPTY_TEXT = "empty_text"
EMPTY_IMAGE = "empty_image"
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
NO_IMAGE = "no_image"
SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"
NO_ASSISTANT_TURN = "no_assistant_turn"
BAD_ROLE = "bad_role"
EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
# Append new reasons at the end: feature caches (features.py) store a skipped image's reason as its index here.
BAD_REASONS = (
    TRUNCATED_TAR,
    UNREADABLE_SHARD,
    MISSING_FIELD,
    INVALID_JSON,
    INVALID_UTF8,
    EMPTY_TEXT,
    EMPTY_IMAGE,
    UNDECODABLE_IMAGE,
    IMAGE_TOO_LARGE,
    IMAGE_COUNT_MISMATCH,
    NO_IMAGE,
    SPECIAL_TOKEN_IN_TEXT,
    NO_ASSISTANT_TURN,
    BAD_ROLE,
    EXTREME_ASPECT_RATIO,
)
ROLES = ("system", "user", "assistant")


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of BAD_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class TextItem:
    text: str
    loss: bool = True  # False: context the model reads but is not trained to produce


@dataclass
class ImageItem:
    data: bytes
    extension: str = "jpg"  # the member extension without the key, e.g. "jpg" or "0.png"


@dataclass
class ImageTextPair:
    key: str
    image: ImageItem
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict)

    kind = "pair"

    @property
    def items(self) -> list[TextItem | ImageItem]:
        return [self.image, TextItem(self.caption)]

    @property
    def images(self) -> list[ImageItem]:
        return [self.image]

    def validate(self) -> None:
        _check_image(self.key, self.image)
        _check_text(self.key, self.caption)

    def to_members(self) -> dict[str, bytes]:
        members = {self.image.extension: self.image.data, "txt": self.caption.encode()}
        if self.metadata:
            members["json"] = json.dumps(self.metadata, ensure_ascii=False).encode()
        return members


@dataclass
class InterleavedDocument:
    key: str
    items: list[TextItem | ImageItem]
    metadata: dict[str, Any] = field(default_factory=dict)

    kind = "document"

    @property
    def images(self) -> list[ImageItem]:
        return [item for item in self.items if isinstance(item, ImageItem)]

    def validate(self) -> None:
        if not self.images:
            raise BadSample(NO_IMAGE, f"document {self.key!r} has no image")
        texts = [item for item in self.items if isinstance(item, TextItem)]
        if not any(item.text.strip() for item in texts):
            raise BadSample(EMPTY_TEXT, f"document {self.key!r} has no text")
        for item in texts:
            _check_text(self.key, item.text, allow_empty=True)
        for image in self.images:
            _check_image(self.key, image)

    def to_members(self) -> dict[str, bytes]:
        """Images become `KEY.{i}.{ext}` in reading order, whatever they were called before."""
        members: dict[str, bytes] = {}
        entries: list[dict[str, Any]] = []
        for item in self.items:
            if isinstance(item, ImageItem):
                name = f"{len(members)}.{item.extension.rsplit('.', 1)[-1]}"
                members[name] = item.data
                entries.append({"image": name})
            else:
                entries.append({"text": item.text} if item.loss else {"text": item.text, "loss": False})
        document = {"items": entries, **({"metadata": self.metadata} if self.metadata else {})}
        members["doc.json"] = json.dumps(document, ensure_ascii=False).encode()
        return members


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str  # user turns hold one "<image>" marker per image


@dataclass
class Conversation:
    key: str
    turns: list[Turn]
    images: list[ImageItem]  # in the order of the "<image>" markers
    metadata: dict[str, Any] = field(default_factory=dict)

    kind = "conversation"

    def validate(self) -> None:
        if not self.images:
            raise BadSample(NO_IMAGE, f"conversation {self.key!r} has no image")
        for i, turn in enumerate(self.turns):
            if turn.role not in ROLES or (turn.role == "system" and i > 0):
                raise BadSample(BAD_ROLE, f"conversation {self.key!r} turn {i} has role {turn.role!r}")
            if "<|endofchunk|>" in turn.text or (turn.role != "user" and "<image>" in turn.text):
                raise BadSample(SPECIAL_TOKEN_IN_TEXT, f"conversation {self.key!r} turn {i} ({turn.role})")
        if not any(t.role == "assistant" and t.text.strip() for t in self.turns):
            raise BadSample(NO_ASSISTANT_TURN, f"conversation {self.key!r} has no assistant answer")
        markers = sum(turn.text.count("<image>") for turn in self.turns)
        if markers != len(self.images):
            raise BadSample(
                IMAGE_COUNT_MISMATCH,
                f"conversation {self.key!r} has {markers} <image> markers for {len(self.images)} images",
            )
        for image in self.images:
            _check_image(self.key, image)

    def to_members(self) -> dict[str, bytes]:
        members: dict[str, bytes] = {}
        for image in self.images:
            members[f"{len(members)}.{image.extension.rsplit('.', 1)[-1]}"] = image.data
        conversation = {
            "messages": [{"role": t.role, "text": t.text} for t in self.turns],
            "images": list(members),
            **({"metadata": self.metadata} if self.metadata else {}),
        }
        members["conv.json"] = json.dumps(conversation, ensure_ascii=False).encode()
        return members


Sample = ImageTextPair | InterleavedDocument | Conversation


def _check_text(key: str, text: str, allow_empty: bool = False) -> None:
    if not allow_empty and not text.strip():
        raise BadSample(EMPTY_TEXT, f"sample {key!r} has empty text")
    for token in SPECIAL_TOKEN_STRINGS:
        if token in text:
            # It would tokenize to a real special token and break the image/token count.
            raise BadSample(SPECIAL_TOKEN_IN_TEXT, f"sample {key!r} text contains {token!r}")


def _check_image(key: str, image: ImageItem) -> None:
    if not image.data:
        raise BadSample(EMPTY_IMAGE, f"sample {key!r} image {image.extension!r} is 0 bytes")


def _utf8(key: str, extension: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadSample(INVALID_UTF8, f"sample {key!r} member {extension!r}: {error}") from None


def _json(key: str, extension: str, data: bytes) -> Any:
    try:
        return json.loads(_utf8(key, extension, data))
    except json.JSONDecodeError as error:
        raise BadSample(INVALID_JSON, f"sample {key!r} member {extension!r}: {error}") from None


def is_image_member(name: str) -> bool:
    """A document's or conversation's image member ("0.png", "img.1.jpg") by its extension."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def sample_from_members(key: str, members: dict[str, bytes]) -> Sample:
    """Parse and validate one shard sample; raises BadSample naming the reason."""
    if "doc.json" in members:
        return _document_from_members(key, members)
    if "conv.json" in members:
        return _conversation_from_members(key, members)
    images = [ext for ext in members if ext.lower() in IMAGE_EXTENSIONS]
    if "txt" not in members or not images:
        raise BadSample(
            MISSING_FIELD,
            f"sample {key!r} has members {sorted(members)}; a pair needs txt + one of {'/'.join(IMAGE_EXTENSIONS)}, "
            "a document needs doc.json",
        )
    if len(images) > 1:
        raise BadSample(IMAGE_COUNT_MISMATCH, f"pair {key!r} has {len(images)} images {images}")
    metadata = _json(key, "json", members["json"]) if "json" in members else {}
    pair = ImageTextPair(
        key,
        ImageItem(members[images[0]], images[0]),
        _utf8(key, "txt", members["txt"]).strip(),
        metadata if isinstance(metadata, dict) else {},
    )
    pair.validate()
    return pair


def _document_from_members(key: str, members: dict[str, bytes]) -> InterleavedDocument:
    document = _json(key, "doc.json", members["doc.json"])
    entries = document.get("items") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise BadSample(MISSING_FIELD, f"document {key!r}: doc.json needs an 'items' list")
    items: list[TextItem | ImageItem] = []
    used: set[str] = set()
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get("text"), str):
            items.append(TextItem(entry["text"], bool(entry.get("loss", True))))
        elif isinstance(entry, dict) and isinstance(entry.get("image"), str):
            name = entry["image"]
            if name not in members:
                raise BadSample(
                    IMAGE_COUNT_MISMATCH, f"document {key!r} item {i} names image {name!r}, not in the shard"
                )
            used.add(name)
            items.append(ImageItem(members[name], name))
        else:
            raise BadSample(MISSING_FIELD, f"document {key!r} item {i} has neither 'text' nor 'image'")
    unused = sorted(ext for ext in members if is_image_member(ext) and ext not in used)
    if unused:
        raise BadSample(IMAGE_COUNT_MISMATCH, f"document {key!r} has images {unused} that no item places")
    metadata = document.get("metadata", {})
    sample = InterleavedDocument(key, items, metadata if isinstance(metadata, dict) else {})
    sample.validate()
    return sample


def _conversation_from_members(key: str, members: dict[str, bytes]) -> Conversation:
    data = _json(key, "conv.json", members["conv.json"])
    messages = data.get("messages") if isinstance(data, dict) else None
    names = data.get("images", []) if isinstance(data, dict) else None
    if not isinstance(messages, list) or not isinstance(names, list):
        raise BadSample(MISSING_FIELD, f"conversation {key!r}: conv.json needs 'messages' and 'images' lists")
    turns = []
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("text"), str)
        ):
            raise BadSample(
                MISSING_FIELD, f"conversation {key!r} message {i} needs 'role' and 'text' strings"
            )
        turns.append(Turn(message["role"], message["text"]))
    missing = [name for name in names if not isinstance(name, str) or name not in members]
    if missing:
        raise BadSample(
            IMAGE_COUNT_MISMATCH, f"conversation {key!r} names image {missing[0]!r}, not in the shard"
        )
    unused = sorted(ext for ext in members if is_image_member(ext) and ext not in names)
    if unused:
        raise BadSample(
            IMAGE_COUNT_MISMATCH, f"conversation {key!r} has images {unused} that no message places"
        )
    metadata = data.get("metadata", {})
    sample = Conversation(
        key,
        turns,
        [ImageItem(members[name], name) for name in names],
        metadata if isinstance(metadata, dict) else {},
    )
    sample.validate()
    return sample
