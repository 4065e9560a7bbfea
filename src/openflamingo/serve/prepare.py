"""From a checked conversation to what the model takes: the prompt in the server's prompt format, its token ids and
its images read and preprocessed. Runs on a worker thread (image decoding is CPU work the engine need not wait for).

Text is text: a control token typed in a message ("<|im_end|>", "</s>") is tokenized as the characters it is made
of, as OpenAI's API does, so a user cannot close their turn and write the assistant's; control tokens come only from
the prompt format. (The model's own `<image>` / `<|endofchunk|>` are refused in text by the protocol.)
"""

from __future__ import annotations

import functools
import re
import secrets
import threading
from dataclasses import dataclass

import torch

from ..model.language import SpecialTokens
from ..model.prompt_format import END_OF_CHUNK, MEDIA, Message, PromptFormat
from .errors import ApiError
from .images import ImagePolicy, read_image
from .protocol import Conversation

POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")

# A fast tokenizer's Rust object takes no two calls at once: transformers sets options on it for each encode, and a
# second thread then fails with "RuntimeError: Already borrowed". Requests prepare on several worker threads, so
# their encodes take turns (the engine decodes with its own copy).
TOKENIZER_LOCK = threading.Lock()


@dataclass
class Prompt:
    text: str
    input_ids: list[int]
    images: torch.Tensor | None  # (1, T, 1, C, H, W) float32 on the CPU


def context_length(model) -> int | None:
    """Tokens the language model can attend to (prompt + answer), read from its config; None if it states none."""
    config = model.language_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in POSITION_LIMITS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def text_budget(model) -> int | None:
    """Characters of text that cannot fit the context, whatever they are: the context times the longest token."""
    limit = context_length(model)
    if limit is None:
        return None
    with TOKENIZER_LOCK:
        vocabulary = model.tokenizer.get_vocab()
    return limit * max(len(token) for token in vocabulary)


def prepare_prompt(
    model, prompt_format: PromptFormat, conversation: Conversation, policy: ImagePolicy
) -> Prompt:
    text, typed = render(prompt_format, conversation.messages, model.tokenizer, model.config.special_tokens)
    images = [read_image(url, where, policy) for url, where in conversation.image_urls]
    input_ids = tokenize(model.tokenizer, text, typed)
    slots = input_ids.count(model.special_ids.media)
    if slots != len(images):  # a chat template that drops or repeats content would misplace images
        raise ApiError(f"messages: the prompt has {slots} image slots for {len(images)} images", "messages")
    limit = context_length(model)
    if limit is not None and len(input_ids) >= limit:
        raise ApiError(
            f"messages: the prompt is {len(input_ids)} tokens; this model's maximum context length is {limit} "
            "tokens, which must also leave room for the answer",
            "messages",
            code="context_length_exceeded",
        )
    pixels = None
    if images:
        pixels = model.vision_encoder.preprocess(images)[None, :, None]  # (1, T, F=1, C, H, W)
    return Prompt(text, input_ids, pixels)


def render(
    prompt_format: PromptFormat, messages: list[Message], tokenizer, special_tokens: SpecialTokens
) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text, and the [start, end) spans of the control tokens typed in the messages. Each typed one is
    replaced by a marker no one can type (a random nonce) while the format renders, then put back where the marker
    landed: the text is exactly what the format renders from the messages, and we know which tokens were typed."""
    pattern = _control_tokens(tokenizer)
    typed: list[str] = []
    nonce = secrets.token_hex(8)

    def marker(i: int) -> str:
        return f"\ue000{nonce}{i}\ue001"

    def protect(match: re.Match) -> str:
        typed.append(match.group(0))
        return marker(len(typed) - 1)

    if pattern is not None:
        messages = [Message(m.role, pattern.sub(protect, m.text)) for m in messages]
    try:
        text = prompt_format.render(messages, tokenizer, add_generation_prompt=True).text
    except ValueError as error:
        raise ApiError(f"messages: {error}", "messages") from None
    text = special_tokens.model_text(text)  # before the typed tokens are back: they stay as typed
    out, spans, cursor, length = [], [], 0, 0
    for i, token in enumerate(typed):
        at = text.find(marker(i), cursor)
        if at < 0:
            raise ApiError(
                f"messages: the prompt format changed the text around {token!r}; leave it out", "messages"
            )
        out += [text[cursor:at], token]
        length += at - cursor
        spans.append((length, length + len(token)))
        length += len(token)
        cursor = at + len(marker(i))
    out.append(text[cursor:])
    return "".join(out), spans


def tokenize(tokenizer, text: str, typed: list[tuple[int, int]]) -> list[int]:
    """Token ids of `text`, the control tokens at the `typed` spans as ordinary text."""
    with TOKENIZER_LOCK:
        return _tokenize(tokenizer, text, typed)


def _tokenize(tokenizer, text: str, typed: list[tuple[int, int]]) -> list[int]:
    if not typed:
        return tokenizer(text)["input_ids"]
    if not getattr(tokenizer, "is_fast", False):
        raise ApiError(
            "messages: this tokenizer cannot take control tokens as text; leave them out", "messages"
        )
    encoding = tokenizer(text, return_offsets_mapping=True)
    added = set(tokenizer.get_added_vocab().values())
    ids: list[int] = []
    for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        if token in added and end > start and any(s <= start and end <= e for s, e in typed):
            as_text = tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)
            ids += as_text["input_ids"]
        else:
            ids.append(token)
    return ids


@functools.cache
def _control_tokens(tokenizer) -> re.Pattern | None:
    """A pattern of the tokenizer's added tokens (longest first) other than the Flamingo markers."""
    with TOKENIZER_LOCK:
        added = tokenizer.get_added_vocab()
    tokens = sorted(set(added) - {MEDIA, END_OF_CHUNK}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def answer_budget(prompt: Prompt, requested: int | None, model, max_tokens: int) -> int:
    """max_tokens for the answer: as requested when the context holds it, else a 400 like OpenAI's; by default
    whatever the context leaves, up to the server's --max-tokens."""
    limit = context_length(model)
    room = max_tokens if limit is None else limit - len(prompt.input_ids)
    if requested is None:
        return min(max_tokens, room)
    if requested > room:
        raise ApiError(
            f"max_tokens: this model's maximum context length is {limit} tokens; the messages take "
            f"{len(prompt.input_ids)} and max_tokens asks for {requested} more",
            "max_tokens",
            code="context_length_exceeded",
        )
    return requested


def candidate_ids(model, prompt_format: PromptFormat, candidates: list[str]) -> list[list[int]]:
    """Candidates as the answer's tokens: in the flamingo format an answer follows the template's space (" blue"),
    as the evaluation tokenizes class names (eval/runner.py)."""
    lead = (
        " "
        if prompt_format.kind == "flamingo" and prompt_format.template.split("{answer}")[0].endswith(" ")
        else ""
    )
    texts = [lead + c.strip() for c in candidates]
    with TOKENIZER_LOCK:
        ids = model.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for i, tokens in enumerate(ids):
        if not tokens:
            raise ApiError(f"candidates[{i}]: tokenizes to nothing", f"candidates[{i}]")
    return ids
