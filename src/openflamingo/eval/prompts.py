"""Few-shot prompts and the post-processing of generated answers (OpenFlamingo's conventions).

A prompt is the demonstrations followed by the query: "<image>Output:a cat.<|endofchunk|>\n<image>Output:".
Zero-shot comes in two forms: Flamingo's, with two demonstrations whose images are removed (text only, so the model
sees the answer format), and true zero-shot with the query alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..model.prompt_format import END_OF_CHUNK, MEDIA, Message, PromptFormat
from .datasets import Example
from .tasks import TaskPrompt

# A prompt format that writes dialogue turns, and the tokenizer (whose chat template the chat kind uses)
DialogueFormat = tuple[PromptFormat, object]

FLAMINGO_ZERO_SHOT_DEMOS = (
    2  # Flamingo (Alayrac et al. 2022, appendix) and OpenFlamingo's zero-shot convention
)


def num_demos(shots: int, zero_shot: str) -> int:
    if shots > 0:
        return shots
    if zero_shot == "text-demos":
        return FLAMINGO_ZERO_SHOT_DEMOS
    if zero_shot == "none":
        return 0
    raise InputError(f"zero_shot must be 'text-demos' or 'none', got {zero_shot!r}")


@dataclass
class Prompt:
    text: str
    images: list[Path]  # in the order of the <image> tokens of `text`


def fill(template: str, example: Example, answer: str) -> str:
    try:
        return template.format(answer=answer, **example.fields)
    except KeyError as error:
        raise InputError(
            f"prompt template {template!r} uses {{{error.args[0]}}}, which example {example.id!r} does not have "
            f"(it has: {', '.join(['answer', *example.fields])})"
        ) from None


def dialogue_format(model) -> DialogueFormat | None:
    """What `build_prompt` needs for a model whose recorded prompt format writes dialogue turns: its LM's chat
    template, or a flamingo template whose answers close with their own `answer_end` (IDEFICS-instruct's
    "User:...<end_of_utterance>\nAssistant: ...") rather than with the end of chunk that closes the task
    templates' demonstrations. None for the others: they were trained on documents like the task templates."""
    prompt_format = model.config.prompt_format
    if prompt_format.kind == "chat" or prompt_format.answer_end is not None:
        return prompt_format, model.tokenizer
    return None


def _dialogue_prompt(
    fmt: TaskPrompt, demos: list[Example], query: Example, shots: int, dialogue: DialogueFormat
) -> Prompt:
    prompt_format, tokenizer = dialogue
    question = fmt.template.split("{answer}", 1)[0]
    messages, images = [], []
    for demo in demos:
        text = fill(question, demo, "").strip()
        messages += [
            Message("user", text if shots else text.replace(MEDIA, "")),
            Message("assistant", demo.target.strip()),
        ]
        images += [candidates[0] for candidates in demo.images] if shots else []
    messages.append(Message("user", fill(question, query, "").strip()))
    images += [candidates[0] for candidates in query.images]
    return Prompt(prompt_format.render(messages, tokenizer, add_generation_prompt=True).text, images)


def answer_follows_space(template: str) -> bool:
    """ "Answer: {answer}" rather than OpenFlamingo's "Answer:{answer}": then answers are scored/generated with
    their leading space, the way a BPE tokenizer splits "Answer: blue" (":" + " blue")."""
    return template.split("{answer}", 1)[0].endswith(" ")


def build_prompt(
    fmt: TaskPrompt, demos: list[Example], query: Example, shots: int, dialogue: DialogueFormat | None = None
) -> Prompt:
    """Demonstrations (with their images when shots > 0, text only for zero-shot) followed by the query; with
    `dialogue` (a model trained on dialogue turns, see `dialogue_format`) each example's prompt is a user turn and
    its answer the reply."""
    if dialogue is not None:
        return _dialogue_prompt(fmt, demos, query, shots, dialogue)
    parts, images = [], []
    for demo in demos:
        text = fill(fmt.template, demo, demo.target.strip()) + END_OF_CHUNK + fmt.separator
        if shots == 0:
            text = text.replace(MEDIA, "")
        else:
            images += [candidates[0] for candidates in demo.images]
        parts.append(text)
    query_text = fill(fmt.template.split("{answer}", 1)[0], query, "")  # the query ends where its answer goes
    if answer_follows_space(fmt.template):
        query_text = query_text[
            :-1
        ]  # the space belongs to the answer's first token (" blue"), as in training
    expected = len(query.images)
    if query_text.count(MEDIA) != expected:
        raise InputError(
            f"prompt template {fmt.template!r} has {query_text.count(MEDIA)} {MEDIA} tokens but examples have "
            f"{expected} image(s)"
        )
    images += [candidates[0] for candidates in query.images]
    return Prompt("".join(parts) + query_text, images)


# ----- post-processing of generations -----------------------------------------------------------------------------
def until_stop(text: str, stops: list[str]) -> str:
    """The generated text before the first stop string. A stop that is one special token is dropped by decoding
    already; one spanning several tokens (IDEFICS-instruct's <end_of_utterance>) ends generation with its text
    included, and the text that follows a stopped row in a batch is padding."""
    ends = [text.find(stop) for stop in stops if stop in text]
    return text[: min(ends)] if ends else text


def postprocess_caption(text: str) -> str:
    """The caption ends where the model starts another demonstration ("Output"); quotes are dropped."""
    return text.split("Output", 1)[0].replace('"', "")


def postprocess_vqa(text: str) -> str:
    """The answer ends where another question starts, and at the first ", "."""
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0]


def postprocessor(name: str, stemmer=None) -> Callable[[str], str]:
    if name == "caption":
        return postprocess_caption
    if name == "vqa":
        return postprocess_vqa
    if name == "okvqa":
        if stemmer is None:
            from .okvqa_stemming import nltk_stemmer

            stemmer = nltk_stemmer()
        return lambda text: stemmer.stem(postprocess_vqa(text))
    if name == "none":
        return lambda text: text.strip()
    raise InputError(f"unknown post-processing {name!r}; known: caption, vqa, okvqa, none")
