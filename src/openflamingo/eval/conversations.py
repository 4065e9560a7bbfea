"""Held-out conversations: each assistant turn generated after the true earlier turns, in the model's prompt format.

Scored two ways (the fine-tuning demo's before/after table): the answer word found in the reply (easy-VQA's 13
answers; "It is brown." -> brown, "No." -> no) against the true one, and whether the reply is the sentence the data
teaches ("It is brown.", "It is a circle.", "Yes.", "No.").
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable

import torch
from PIL import Image
from tqdm import tqdm

from ..data.samples import Conversation
from ..model.inputs import prepare_inputs, to_device
from ..model.prompt_format import MEDIA, Message

SENTENCE = re.compile(r"(It is (a )?[a-z]+\.|Yes\.|No\.)")


def answer_word(reply: str, answers: Iterable[str]) -> str | None:
    """The first of `answers` that the reply names as a word."""
    words = re.findall(r"[a-z]+", reply.lower())
    return next((word for word in words if word in set(answers)), None)


def turn_prompts(model, conversation: Conversation) -> list[tuple[str, int, str]]:
    """(prompt, images in the prompt, true answer) for each assistant turn."""
    prompts = []
    for i, turn in enumerate(conversation.turns):
        if turn.role != "assistant":
            continue
        history = [Message(t.role, t.text) for t in conversation.turns[:i]]
        text = model.config.prompt_format.render(history, model.tokenizer, add_generation_prompt=True).text
        prompts.append((text, text.count(MEDIA), turn.text))
    return prompts


@torch.no_grad()
def evaluate_conversations(
    model,
    conversations: list[Conversation],
    answers: Iterable[str],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Greedy replies to every assistant turn; answer accuracy and the share of well-formed sentences."""
    answers = sorted(set(answers))
    device = next(model.parameters()).device
    items = []
    for conversation in conversations:
        images = [Image.open(io.BytesIO(item.data)).convert("RGB") for item in conversation.images]
        items += [
            (prompt, images[:count], truth) for prompt, count, truth in turn_prompts(model, conversation)
        ]
    correct = well_formed = 0
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="conversations", disable=not progress):
        inputs = prepare_inputs(
            model, [p for p, _, _ in batch], [images for _, images, _ in batch], padding_side="left"
        )
        inputs = to_device(inputs, device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        replies = model.tokenizer.batch_decode(
            output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for reply, (_, _, truth) in zip(replies, batch, strict=True):
            reply = reply.strip()
            correct += answer_word(reply, answers) == answer_word(truth, answers)
            well_formed += SENTENCE.fullmatch(reply) is not None
    return {
        "answer_accuracy": correct / len(items),
        "well_formed": well_formed / len(items),
        "turns": len(items),
    }
