"""How a model's prompts are written: Flamingo's plain interleaved text, or the language model's own chat template.

A conversation is a list of `Message`s whose text holds an `<image>` marker where each image goes. The format is
part of the model config, so a checkpoint records the format it was trained with, and training data, `generate`,
`eval` and `serve` all render conversations the same way.

- `flamingo`: `template` is one exchange, e.g. "Question:{question} Short answer:{answer}". A user turn's leading
  images come first ("<image>Question:...", or where the template writes `{images}`: IDEFICS-instruct's
  "User:{images}{question}<end_of_utterance>\nAssistant: {answer}<end_of_utterance>\n"), the assistant's answer
  replaces `{answer}` and is closed by `<|endofchunk|>` (where OpenFlamingo's few-shot prompts close each
  demonstration), or by `answer_end`. `stop` adds strings an answer also ends at.
- `chat`: the tokenizer's chat template renders the turns, images staying where the user put them.

`render` also returns where each assistant turn is in the text: the spans a model is trained to produce.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from ..errors import InputError

MEDIA = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
KINDS = ("flamingo", "chat")
ROLES = ("system", "user", "assistant")
OPENFLAMINGO_VQA = "Question:{question} Short answer:{answer}"


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    text: str  # with one MEDIA marker per image, in the order of the conversation's images


@dataclass
class RenderedPrompt:
    text: str
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each assistant turn


@dataclass
class PromptFormat:
    kind: str = "flamingo"  # "flamingo" | "chat"
    template: str = OPENFLAMINGO_VQA  # flamingo: one exchange, with {question} and {answer}
    system: str | None = None  # a system message put first when the conversation has none
    # More strings where answers end (the model's own come first).
    stop: list[str] = field(default_factory=list)
    # flamingo kind: what closes each answer after the template's text; None: the model's end of chunk. IDEFICS-instruct
    # closes answers with <end_of_utterance> in its template and nothing else: an end of sequence there would hide
    # the image from the next turn.
    answer_end: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"prompt_format.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        fields = [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]
        if sorted(set(fields) - {"images"}) != ["answer", "question"] or len(fields) != len(set(fields)):
            raise InputError(
                f"prompt_format.template {self.template!r} must use {{question}} and {{answer}} once each "
                "(and {images} at most once), and nothing else"
            )
        self.stop = list(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InputError(f"prompt_format.stop={self.stop!r} must list non-empty strings")
        if self.template.index("{answer}") < self.template.index("{question}"):
            raise InputError(f"prompt_format.template {self.template!r}: {{answer}} must follow {{question}}")
        if self.template.find("{images}") > self.template.index("{answer}"):
            raise InputError(
                f"prompt_format.template {self.template!r}: {{images}} must come before {{answer}}"
            )
        if MEDIA in self.template:
            raise InputError(
                f"prompt_format.template {self.template!r}: leave out {MEDIA}; a turn's images go before it"
            )

    def render(
        self, messages: list[Message], tokenizer=None, add_generation_prompt: bool = False
    ) -> RenderedPrompt:
        """The conversation as model text; `add_generation_prompt` ends it where the next answer starts (the last
        message must then be the user's). The chat kind needs the tokenizer (its chat template); it locates the
        answers (rendering the template once more per answer) only for training text, without
        `add_generation_prompt`, and leaves `answer_spans` empty for a prompt."""
        _check_messages(messages, add_generation_prompt)
        if self.kind == "flamingo":
            return self._render_flamingo(messages)
        return self._render_chat(messages, tokenizer, add_generation_prompt)

    def stop_strings(self, tokenizer=None, end_of_chunk: str = END_OF_CHUNK) -> list[str]:
        """Where an answer ends, in the model's text (`end_of_chunk` is its own; see SpecialTokens)."""
        if self.kind == "flamingo":
            closing = [end_of_chunk] if self.answer_end is None else [self.answer_end] * bool(self.answer_end)
            return list(dict.fromkeys([*closing, *self.stop]))
        if tokenizer is None or tokenizer.eos_token is None:
            raise InputError(
                "the chat prompt format needs a tokenizer with an eos_token to know where answers end"
            )
        return list(dict.fromkeys([tokenizer.eos_token, end_of_chunk, *self.stop]))

    # ----- the two kinds ---------------------------------------------------------------------------------------
    def _exchange_parts(self) -> tuple[str, str, str]:
        """(user part with {question}, what goes before the answer, what follows it). A space before {answer}
        belongs to the answer, the way a BPE tokenizer splits "answer: blue" into ":" and " blue"."""
        user, after = self.template.split("{answer}", 1)
        lead = ""
        if user.endswith(" "):
            user, lead = user[:-1], " "
        return user, lead, after

    def _render_flamingo(self, messages: list[Message]) -> RenderedPrompt:
        user_part, lead, after = self._exchange_parts()
        text, spans = "", []
        for message in messages:
            if message.role == "system":
                text += message.text.strip() + "\n"
            elif message.role == "user":
                body = message.text.strip()
                leading = re.match(rf"(?:{re.escape(MEDIA)}\s*)*", body).group(0)
                images = leading.count(MEDIA)
                question = body[len(leading) :].strip()
                if "{images}" in user_part:
                    text += user_part.format(question=question, images=MEDIA * images)
                else:
                    text += MEDIA * images + user_part.format(question=question)
            else:
                start = len(text)
                closing = END_OF_CHUNK if self.answer_end is None else self.answer_end
                text += lead + message.text.strip() + after + closing
                spans.append((start, len(text)))
        return RenderedPrompt(text, spans)

    def _render_chat(self, messages: list[Message], tokenizer, add_generation_prompt: bool) -> RenderedPrompt:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "prompt_format.kind = 'chat' needs a tokenizer with a chat template; this language model's "
                "tokenizer has none (use kind = 'flamingo')"
            )
        turns = [{"role": m.role, "content": m.text.strip()} for m in messages]
        if self.system is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system})

        def apply(upto: int, generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(
                turns[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )

        text = apply(len(turns), add_generation_prompt)
        if add_generation_prompt:
            return RenderedPrompt(text)
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before, through = apply(i, True), apply(i + 1, False)
            if not through.startswith(before):
                raise InputError(
                    "this chat template renders earlier turns differently once an answer follows, so answers "
                    "cannot be located for training; use prompt_format.kind = 'flamingo'"
                )
            spans.append((len(before), len(through)))
        return RenderedPrompt(text, spans)


def _check_messages(messages: list[Message], add_generation_prompt: bool) -> None:
    if not messages:
        raise InputError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InputError(f"message {i}: role {message.role!r} is not one of {', '.join(ROLES)}")
        if END_OF_CHUNK in message.text:
            raise InputError(f"message {i} ({message.role}) contains {END_OF_CHUNK!r}")
        if message.role != "user" and MEDIA in message.text:
            raise InputError(f"message {i} ({message.role}) has an image; only user messages can")
        if message.role == "system" and i != 0:
            raise InputError(f"message {i}: a system message must come first")
    if add_generation_prompt and messages[-1].role != "user":
        raise InputError(
            f"the last message must be the user's to prompt an answer, got {messages[-1].role!r}"
        )
