"""Serving builders: chat conversations about coloured images, engine jobs with their collected answers, and what
Flamingo.generate answers for the prompt the server builds. (The tiny model and the live server: serving.py.)"""

from __future__ import annotations

import threading

from serving import MODEL, image_part

from openflamingo.model.inputs import prepare_inputs
from openflamingo.serve.engine import Delta, Failed, Finished, GenerationJob
from openflamingo.serve.images import ImagePolicy
from openflamingo.serve.prepare import prepare_prompt
from openflamingo.serve.protocol import Limits, parse_messages
from openflamingo.serve.sampling import Sampling

COLORS = [(200, 30, 30), (20, 160, 40), (30, 40, 220), (240, 200, 10)]


def conversation(images: int, words: int, turns: int = 1) -> list[dict]:
    messages = []
    for t in range(turns):
        parts = [image_part(COLORS[(t + i) % 4]) for i in range(images)]
        messages.append(
            {
                "role": "user",
                "content": [*parts, {"type": "text", "text": "what is the " + "red cat " * words}],
            }
        )
        if t < turns - 1:
            messages.append({"role": "assistant", "content": "a small dog"})
    return messages


class Answers:
    """Collects a job's events (from the engine thread) and signals when all answers are in."""

    def __init__(self, n: int):
        self.texts, self.reasons, self.tokens = [""] * n, [None] * n, [0] * n
        self.first = threading.Event()
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Delta):
            self.texts[event.choice] += event.text
        elif isinstance(event, Finished):
            self.reasons[event.choice], self.tokens[event.choice] = (
                event.finish_reason,
                event.completion_tokens,
            )
        else:
            assert not isinstance(event, Failed), event.message
        self.first.set()
        if all(self.reasons):
            self.done.set()


def job(model, messages, max_tokens, n=1, temperature=0.0, seed=None, stop=()):
    prompt = prepare_prompt(
        model, model.config.prompt_format, parse_messages(messages, Limits("m")), ImagePolicy()
    )
    answers = Answers(n)
    sampling = [Sampling.for_choice(temperature, 0.9, seed, i) for i in range(n)]
    return GenerationJob(prompt.input_ids, prompt.images, max_tokens, list(stop), sampling, answers), answers


def generate(model, messages, max_new_tokens) -> str:
    """What Flamingo.generate answers for the prompt the server builds."""
    conversation = parse_messages(messages, Limits(MODEL))
    prompt = prepare_prompt(model, model.config.prompt_format, conversation, ImagePolicy())
    inputs = prepare_inputs(model, [prompt.text], [[]])
    output = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        images=prompt.images,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return model.tokenizer.decode(
        output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).lstrip()
