"""Request bodies of the OpenAI chat format (and our /v1/score), checked field by field into typed requests.

Every error is an ApiError naming the field as OpenAI's `param` does ("messages[1].content[0].image_url"), so a
client can see exactly which message, part or value was wrong. Unknown fields are refused like OpenAI refuses them;
fields we accept but do not implement are refused unless they hold their no-op value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
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
MAX_JSON_DEPTH = 32  # our schema nests 5 deep
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit integer, as OpenAI's


@dataclass(frozen=True)
class Limits:
    """What this server accepts, from its command line (and the text budget from the model's context)."""

    model_name: str
    max_images: int = 8
    max_tokens: int = 512  # upper bound of a request's max_tokens
    max_n: int = 8
    max_candidates: int = 10_000
    max_score_tokens: int = 8192  # candidate tokens of one /v1/score request, all candidates together
    max_stop_chars: int = 256  # per stop sequence
    # Characters of text in one request: more than the context could hold even if every token were the longest
    # token of the vocabulary; refused before tokenizing. None: no bound (a model without a stated context).
    max_text_chars: int | None = None


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
    """The body as a JSON object whose strings are all valid Unicode, nested at most MAX_JSON_DEPTH deep."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise ApiError(f"malformed JSON in the request body: {error}", code="invalid_json") from None
    except UnicodeDecodeError:
        raise ApiError("the request body is not UTF-8 text", code="invalid_json") from None
    except RecursionError:
        raise ApiError(
            f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        ) from None
    except ValueError as error:  # an integer of more digits than Python converts, NaN / Infinity
        raise ApiError(f"malformed JSON in the request body: {error.args[0]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {_json_type(data)}")
    _check_tree(data)
    return data


def _refuse_constant(name: str) -> None:
    raise InputError(f"{name} is not a JSON number")


def _check_tree(data: dict) -> None:
    """Refuse nesting past MAX_JSON_DEPTH and strings (keys too) that are not valid Unicode: JSON's \\ud800 escapes
    decode to lone surrogates, which no tokenizer or response encoder takes."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_unicode(key, f"{where}.(a key)" if where else "(a key)")
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_unicode(value, where)


def _check_unicode(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = where.encode("utf-8", "backslashreplace").decode()
        raise ApiError(f"{where}: invalid Unicode (a lone surrogate)", where, code="invalid_text") from None


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
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError("seed: out of range; expected a 64-bit integer", "seed", code="invalid_value")
    conversation_chars(conversation, limits)
    return ChatRequest(
        conversation=conversation,
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0),
        n=_integer(data, "n", 1, 1, limits.max_n, "--max-batch-size"),
        stop=_stop(data.get("stop"), limits),
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
            f"candidates: {len(candidates)} candidates, over this server's limit of {limits.max_candidates} "
            "(--max-candidates)",
            "candidates",
        )
    for i, candidate in enumerate(candidates):
        where = f"candidates[{i}]"
        if not isinstance(candidate, str) or not candidate.strip():
            raise ApiError(f"{where}: expected a non-empty string, got {_json_type(candidate)}", where)
        _check_text(candidate, where)
    conversation_chars(conversation, limits, extra=sum(len(c) for c in candidates))
    return ScoreRequest(conversation, candidates)


def conversation_chars(conversation: Conversation, limits: Limits, extra: int = 0) -> None:
    """Refuse text that cannot fit the context before any of it is tokenized."""
    chars = extra + sum(len(m.text) for m in conversation.messages)
    if limits.max_text_chars is not None and chars > limits.max_text_chars:
        raise ApiError(
            f"messages: {chars} characters of text cannot fit this model's context (at most "
            f"{limits.max_text_chars} characters)",
            "messages",
            code="context_length_exceeded",
        )


def parse_messages(messages: Any, limits: Limits) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise ApiError(f"messages: expected a non-empty list, got {_json_type(messages)}", "messages")
    out, urls = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(f"{where}: expected an object, got {_json_type(message)}", where)
        _check_fields(message, {"role", "content", "name"}, prefix=f"{where}.")
        _typed(message, "name", str, None, prefix=f"{where}.")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(
                f"{where}.role: {_json_type(role)} is not supported; use one of {', '.join(ROLES)}",
                f"{where}.role",
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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(f"{key}: expected a number, got {_json_type(value)}", key, code="invalid_type")
    if not low <= value <= high:  # compared exactly: an integer too large for a float is out of range too
        raise ApiError(
            f"{key}: {_json_type(value)} is out of range; expected {low} to {high}", key, code="invalid_value"
        )
    return float(value)


def _integer(data: dict, key: str, default: int | None, low: int, high: int, flag: str) -> int | None:
    value = _typed(data, key, int, default)
    if value is not None and not low <= value <= high:
        raise ApiError(
            f"{key}: {_json_type(value)} is out of range; this server accepts {low} to {high} ({flag})",
            key,
            code="invalid_value",
        )
    return value


def _stop(stop: Any, limits: Limits) -> list[str]:
    if stop is None:
        return []
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(s, str) and s for s in sequences):
        raise ApiError(f"stop: expected a non-empty string or a list of them, got {_json_type(stop)}", "stop")
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise ApiError(f"stop: {len(sequences)} sequences, at most {MAX_STOP_SEQUENCES} are allowed", "stop")
    for sequence in sequences:
        if len(sequence) > limits.max_stop_chars:
            raise ApiError(
                f"stop: a sequence of {len(sequence)} characters, over this server's limit of "
                f"{limits.max_stop_chars} (--max-stop-chars)",
                "stop",
                code="invalid_value",
            )
    return sequences


_TYPE_NAMES = {bool: "a boolean", int: "an integer", dict: "an object", str: "a string", list: "a list"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"a number of {len(str(abs(value)))} digits"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
