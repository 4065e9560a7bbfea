"""From a checked conversation to what the model takes: the prompt in the server's prompt format, its token ids and
its images read and preprocessed. Runs on a worker thread (image decoding is CPU work the engine need not wait for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.prompt_format import PromptFormat
from .errors import ApiError
from .images import ImagePolicy, read_image
from .protocol import Conversation

POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


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


def prepare_prompt(
    model, prompt_format: PromptFormat, conversation: Conversation, policy: ImagePolicy
) -> Prompt:
    try:
        text = prompt_format.render(conversation.messages, model.tokenizer, add_generation_prompt=True).text
    except ValueError as error:
        raise ApiError(f"messages: {error}", "messages") from None
    images = [read_image(url, where, policy) for url, where in conversation.image_urls]
    input_ids = model.tokenizer(text)["input_ids"]
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
    ids = model.tokenizer([lead + c.strip() for c in candidates], add_special_tokens=False)["input_ids"]
    for i, tokens in enumerate(ids):
        if not tokens:
            raise ApiError(f"candidates[{i}]: tokenizes to nothing", f"candidates[{i}]")
    return ids
