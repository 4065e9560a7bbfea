"""Text formatting, truncation and labels: a sample's items -> token ids and labels.

Layout (OpenFlamingo's): `[BOS] prefix <image>chunk 1<|endofchunk|><image>chunk 2<|endofchunk|>EOS`, where the
prefix is text before the first image and chunk i is the text between image i and the next image (several text
items in a chunk are joined by a space). A pair is `<image>caption<|endofchunk|>EOS`.

Labels are the ids with -100 on: `<image>` tokens (the model never predicts an image), text before the first image
(nothing to condition on; configurable), and text items marked `loss=False` (questions, prompts). `<|endofchunk|>`
and EOS are trained, so the model learns to stop. Padding is masked later by the collator.

Conversations are rendered in the model's prompt format (openflamingo.model.prompt_format) and only the assistant
turns are trained, each with the token that closes it (`<|endofchunk|>`, or the chat template's end of turn).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InputError
from ..model.language import SpecialTokens, add_special_tokens
from ..model.prompt_format import Message, PromptFormat
from .samples import Conversation, ImageItem, Sample, TextItem

IGNORE_INDEX = -100


@dataclass
class FormatConfig:
    max_tokens: int = 256  # per sample, special tokens included
    max_images: int = 6  # per sample: image chunks beyond it are dropped (converters split them off instead)
    mask_text_before_first_image: bool = True
    prompt_format: PromptFormat = field(default_factory=PromptFormat)  # how conversations are written
    special_tokens: SpecialTokens = field(
        default_factory=SpecialTokens
    )  # the model's own (IDEFICS has others)

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise InputError(f"max_tokens={self.max_tokens} is too small to hold an image chunk; use >= 8")
        if self.max_images < 1:
            raise InputError(f"max_images must be >= 1, got {self.max_images}")
        if isinstance(self.prompt_format, dict):  # from a TOML table
            self.prompt_format = PromptFormat(**self.prompt_format)
        if isinstance(self.special_tokens, dict):
            self.special_tokens = SpecialTokens(**self.special_tokens)


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    num_images: int  # the sample's first num_images images are used, one per <image> token
    truncated: bool  # text or image chunks were cut to fit max_tokens / max_images


def _leading_special_ids(tokenizer) -> list[int]:
    """What the tokenizer puts before text by itself (e.g. Llama's BOS, OPT's </s>); GPT-2 puts nothing."""
    plain = tokenizer("a photo", add_special_tokens=False)["input_ids"]
    full = tokenizer("a photo", add_special_tokens=True)["input_ids"]
    if plain and full[len(full) - len(plain) :] == plain:
        return list(full[: len(full) - len(plain)])
    return []


class SampleFormatter:
    """Formats the items of a pair or document for one tokenizer (prepared with Flamingo's special tokens)."""

    def __init__(self, tokenizer, config: FormatConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or FormatConfig()
        ids = add_special_tokens(tokenizer, self.config.special_tokens)
        self.media_id, self.end_of_chunk_id, self.pad_id = ids.media, ids.end_of_chunk, ids.pad
        # IDEFICS writes a token before and after each image: <fake_token_around_image><image><fake_token_...>
        self.media_ids = (
            [ids.media] if ids.around_media is None else [ids.around_media, ids.media, ids.around_media]
        )
        if tokenizer.eos_token_id is None:
            raise InputError(
                f"tokenizer {type(tokenizer).__name__} has no eos_token; set one before formatting"
            )
        self.eos_id = tokenizer.eos_token_id
        self.leading_ids = _leading_special_ids(tokenizer)

    def format_sample(self, sample: Sample) -> TokenizedSample:
        if isinstance(sample, Conversation):
            return self.format_conversation(sample)
        return self.format(sample.items)

    def format_conversation(self, conversation: Conversation) -> TokenizedSample:
        """The rendered conversation, trained on its assistant turns only; cut at max_tokens (images whose
        `<image>` token is cut are dropped with it)."""
        prompt_format = self.config.prompt_format
        messages = [Message(turn.role, turn.text) for turn in conversation.turns]
        rendered = prompt_format.render(messages, self.tokenizer)
        text, answer_spans = self.config.special_tokens.model_text_and_spans(
            rendered.text, rendered.answer_spans
        )
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids: list[int] = list(encoded["input_ids"])
        trained = [
            any(start <= begin < end for start, end in answer_spans) for begin, _ in encoded["offset_mapping"]
        ]
        labels = [
            IGNORE_INDEX if t in self.media_ids or not on else t
            for t, on in zip(input_ids, trained, strict=True)
        ]
        if prompt_format.kind == "flamingo":  # the chat template writes its own BOS and end of turn
            input_ids = [*self.leading_ids, *input_ids, self.eos_id]
            labels = [IGNORE_INDEX] * len(self.leading_ids) + labels + [self.eos_id]
        truncated = len(input_ids) > self.config.max_tokens
        input_ids, labels = input_ids[: self.config.max_tokens], labels[: self.config.max_tokens]
        num_images = input_ids.count(self.media_id)
        if num_images > self.config.max_images:
            cut = [i for i, t in enumerate(input_ids) if t == self.media_id][self.config.max_images]
            cut -= len(self.media_ids) > 1  # with the token written before it
            input_ids, labels, num_images, truncated = (
                input_ids[:cut],
                labels[:cut],
                self.config.max_images,
                True,
            )
        return TokenizedSample(input_ids, labels, num_images, truncated)

    def format(self, items: Sequence[TextItem | ImageItem]) -> TokenizedSample:
        prefix, chunks = _split_at_images(items)
        pieces = [piece for group in (prefix, *chunks) for piece in group]
        token_lists = (
            self.tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
            if pieces
            else []
        )
        # (ids, trained) per group, pieces concatenated
        groups: list[tuple[list[int], list[bool]]] = []
        position = 0
        for index, group in enumerate((prefix, *chunks)):
            ids: list[int] = []
            trained: list[bool] = []
            for _, loss in group:
                tokens = token_lists[position]
                position += 1
                ids.extend(tokens)
                train = loss and not (index == 0 and self.config.mask_text_before_first_image)
                trained.extend([train] * len(tokens))
            groups.append((ids, trained))
        return self._assemble(groups[0], groups[1:])

    def _assemble(
        self, prefix: tuple[list[int], list[bool]], chunks: list[tuple[list[int], list[bool]]]
    ) -> TokenizedSample:
        budget = self.config.max_tokens - len(self.leading_ids) - 1  # EOS always fits
        usable = chunks[: self.config.max_images]
        truncated = len(usable) < len(chunks)
        prefix_ids, prefix_trained = prefix
        kept: list[tuple[list[int], list[bool]]] = []
        used = len(prefix_ids)
        for ids, trained in usable:
            cost = len(ids) + len(self.media_ids) + 1  # <image> ... <|endofchunk|>
            if used + cost > budget:
                break
            kept.append((ids, trained))
            used += cost
        if len(kept) < len(usable):
            truncated = True
        if not usable and len(prefix_ids) > budget:  # text only (a caller's own samples): keep its start
            prefix_ids, prefix_trained, truncated = prefix_ids[:budget], prefix_trained[:budget], True
        if not kept and usable:
            # Not even the first image chunk fits: keep the end of the prefix (nearest the image) in what the chunk
            # leaves, and if the chunk alone is too long, cut its text but keep <image>, <|endofchunk|> and EOS.
            ids, trained = usable[0]
            marks = len(self.media_ids) + 1
            room = max(budget - marks, 1)
            ids, trained = ids[:room], trained[:room]
            keep_prefix = max(budget - len(ids) - marks, 0)
            start = len(prefix_ids) - keep_prefix
            prefix_ids, prefix_trained = prefix_ids[start:], prefix_trained[start:]
            kept = [(ids, trained)]
        input_ids = [*self.leading_ids, *prefix_ids]
        labels = [IGNORE_INDEX] * len(self.leading_ids) + _labels(prefix_ids, prefix_trained)
        for ids, trained in kept:
            input_ids += [*self.media_ids, *ids, self.end_of_chunk_id]
            labels += [IGNORE_INDEX] * len(self.media_ids) + [*_labels(ids, trained), self.end_of_chunk_id]
        input_ids.append(self.eos_id)
        labels.append(self.eos_id)
        return TokenizedSample(input_ids, labels, len(kept), truncated)


def _labels(ids: list[int], trained: list[bool]) -> list[int]:
    return [token if train else IGNORE_INDEX for token, train in zip(ids, trained, strict=True)]


def _split_at_images(
    items: Sequence[TextItem | ImageItem],
) -> tuple[list[tuple[str, bool]], list[list[tuple[str, bool]]]]:
    """(prefix pieces, one list of pieces per image); a piece is (text, loss) with its joining space included."""
    prefix: list[tuple[str, bool]] = []
    chunks: list[list[tuple[str, bool]]] = []
    for item in items:
        if isinstance(item, ImageItem):
            chunks.append([])
            continue
        text = item.text.strip()
        if not text:
            continue
        group = chunks[-1] if chunks else prefix
        group.append((f" {text}" if group else text, item.loss))
    return prefix, chunks
