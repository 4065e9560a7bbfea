"""Request bodies of the OpenAI chat format (and our /v1/score), checked field by field into typed requests.

Every error is an ApiError naming the field as OpenAI's `param` does ("messages[1].content[0].image_url"), so a
client can see exactly which message, part or value was wrong. Unknown fields are refused like OpenAI refuses them;
fields we accept but do not implement are refused unless they hold their no-op value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..model.prompt_format import END_OF_CHUNK, MEDIA, Message
from .errors import ApiError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Accepted when they hold the value that changes nothing (what client libraries send by default).
NO_OP_FIELDS: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "logit_bias": (None,),
    "tools": (None,),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, True, False),
}
# Bookkeeping that does not change the answer: accepted and ignored.
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier"}
MAX_STOP_SEQUENCES = 4  # as OpenAI


@dataclass(frozen=True)
class Limits:
    """What this server accepts, from its command line."""

    model_name: str
    max_images: int = 8
    max_tokens: int = 512  # upper bound of a request's max_tokens
    max_n: int = 8
    max_candidates: int = 10_000


@dataclass
class Conversation:
    """Messages in the model's prompt-format terms: `<image>` where each image goes, images' URLs in order."""

    messages: list[Message]
    image_urls: list[tuple[str, str]]  # (url, param naming where it came from)


@dataclass
class ChatRequest:
    conversation: Conversation
    max_tokens: int | None  # None: whatever the context leaves, up to Limits.max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


@dataclass
class ScoreRequest:
    conversation: Conversation
    candidates: list[str]


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(f"malformed JSON in the request body: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {_json_type(data)}")
    return data


def parse_chat_request(data: dict[str, Any], limits: Limits) -> ChatRequest:
    known = {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
        "seed", "stream", "stream_options",
    }  # fmt: skip
    _check_fields(data, known)
    _check_model(data, limits)
    conversation = parse_messages(data.get("messages"), limits)
    if conversation.messages[-1].role != "user":
        raise ApiError("messages: the last message must be the user's, to be answered", "messages")
    max_tokens = _max_tokens(data, limits)
    stream = _typed(data, "stream", bool, False)
    options = _typed(data, "stream_options", dict, None)
    if options is not None and not stream:
        raise ApiError("stream_options: only allowed with stream: true", "stream_options")
    include_usage = False
    if options is not None:
        _check_fields(options, {"include_usage"}, prefix="stream_options.")
        include_usage = _typed(options, "include_usage", bool, False, prefix="stream_options.")
    seed = _typed(data, "seed", int, None)
    return ChatRequest(
        conversation=conversation,
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0),
        n=_integer(data, "n", 1, 1, limits.max_n, "--max-batch-size"),
        stop=_stop(data.get("stop")),
        seed=seed,
        stream=stream,
        include_usage=include_usage,
    )


def parse_score_request(data: dict[str, Any], limits: Limits) -> ScoreRequest:
    _check_fields(data, {"model", "messages", "candidates"})
    _check_model(data, limits)
    conversation = parse_messages(data.get("messages"), limits)
    if conversation.messages[-1].role != "user":
        raise ApiError("messages: the last message must be the user's, whose answers are scored", "messages")
    candidates = data.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise ApiError(
            f"candidates: expected a non-empty list of strings, got {_json_type(candidates)}", "candidates"
        )
    if len(candidates) > limits.max_candidates:
        raise ApiError(
            f"candidates: {len(candidates)} candidates, over this server's limit of {limits.max_candidates}",
            "candidates",
        )
    for i, candidate in enumerate(candidates):
        where = f"candidates[{i}]"
        if not isinstance(candidate, str) or not candidate.strip():
            raise ApiError(f"{where}: expected a non-empty string, got {_json_type(candidate)}", where)
        _check_text(candidate, where)
    return ScoreRequest(conversation, candidates)


def parse_messages(messages: Any, limits: Limits) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise ApiError(f"messages: expected a non-empty list, got {_json_type(messages)}", "messages")
    out, urls = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(f"{where}: expected an object, got {_json_type(message)}", where)
        _check_fields(message, {"role", "content", "name"}, prefix=f"{where}.")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(
                f"{where}.role: {role!r} is not supported; use one of {', '.join(ROLES)}", f"{where}.role"
            )
        text = _content(message.get("content"), ROLES[role], f"{where}.content", urls, limits)
        out.append(Message(ROLES[role], text))
    for i, message in enumerate(out[1:], 1):
        if message.role == "system":
            raise ApiError(f"messages[{i}]: a system message must come first", f"messages[{i}]")
    return Conversation(out, urls)


def _content(content: Any, role: str, where: str, urls: list, limits: Limits) -> str:
    if isinstance(content, str):
        _check_text(content, where)
        return content
    if not isinstance(content, list):
        raise ApiError(f"{where}: expected a string or a list of parts, got {_json_type(content)}", where)
    text = ""
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            _check_fields(part, {"type", "text"}, prefix=f"{here}.")
            value = part.get("text")
            if not isinstance(value, str):
                raise ApiError(f"{here}.text: expected a string, got {_json_type(value)}", f"{here}.text")
            _check_text(value, f"{here}.text")
            text += value
        elif kind == "image_url":
            _check_fields(part, {"type", "image_url"}, prefix=f"{here}.")
            if role != "user":
                raise ApiError(f"{here}: only user messages can hold images, not {role} messages", here)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise ApiError(
                    f'{here}.image_url: expected {{"url": "data:image/...;base64,..."}}, got {_json_type(image)}',
                    f"{here}.image_url",
                )
            if len(urls) == limits.max_images:
                raise ApiError(
                    f"{here}: more than {limits.max_images} images in the request; this server allows "
                    f"{limits.max_images} (--max-images)",
                    here,
                    code="too_many_images",
                )
            urls.append((url, f"{here}.image_url"))
            text += MEDIA
        else:
            raise ApiError(f'{here}: expected a {{"type": "text"}} or {{"type": "image_url"}} part', here)
    return text


def _check_text(text: str, where: str) -> None:
    for marker in (MEDIA, END_OF_CHUNK):
        if marker in text:
            raise ApiError(
                f"{where}: text contains the model's control token {marker!r}; send images as image_url parts",
                where,
            )


def _check_model(data: dict, limits: Limits) -> None:
    model = data.get("model")
    if not isinstance(model, str):
        raise ApiError(f"model: expected a string, got {_json_type(model)}", "model")
    if model != limits.model_name:
        raise ApiError(
            f"model: {model!r} is not served here; this server serves {limits.model_name!r}",
            "model",
            status=404,
            code="model_not_found",
        )


def _check_fields(data: dict, known: set[str], prefix: str = "") -> None:
    for key, value in data.items():
        if key in known or (not prefix and key in IGNORED_FIELDS):
            continue
        if not prefix and key in NO_OP_FIELDS:
            if value in NO_OP_FIELDS[key] or (key in ("logit_bias", "tools") and not value):
                continue
            raise ApiError(f"{key}: {json.dumps(value)[:80]} is not supported by this server", key)
        raise ApiError(f"unrecognized request argument supplied: {prefix}{key}", f"{prefix}{key}")


def _max_tokens(data: dict, limits: Limits) -> int | None:
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    if data.get(name) is None:
        return None
    return _integer(data, name, None, 1, limits.max_tokens, "--max-tokens")


def _typed(data: dict, key: str, kind: type, default: Any, prefix: str = "") -> Any:
    value = data.get(key)
    if value is None:
        return default
    # JSON true/false are Python bools, which are also ints: an integer field must not take them.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(
            f"{prefix}{key}: expected {_TYPE_NAMES[kind]}, got {_json_type(value)}",
            f"{prefix}{key}",
            code="invalid_type",
        )
    return value


def _number(data: dict, key: str, default: float, low: float, high: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(f"{key}: expected a number, got {_json_type(value)}", key, code="invalid_type")
    if not low <= value <= high:
        raise ApiError(f"{key}: {value} is out of range; expected {low} to {high}", key, code="invalid_value")
    return float(value)


def _integer(data: dict, key: str, default: int | None, low: int, high: int, flag: str) -> int | None:
    value = _typed(data, key, int, default)
    if value is not None and not low <= value <= high:
        raise ApiError(
            f"{key}: {value} is out of range; this server accepts {low} to {high} ({flag})",
            key,
            code="invalid_value",
        )
    return value


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(s, str) and s for s in sequences):
        raise ApiError(f"stop: expected a non-empty string or a list of them, got {_json_type(stop)}", "stop")
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise ApiError(f"stop: {len(sequences)} sequences, at most {MAX_STOP_SEQUENCES} are allowed", "stop")
    return sequences


_TYPE_NAMES = {bool: "a boolean", int: "an integer", dict: "an object", str: "a string", list: "a list"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
