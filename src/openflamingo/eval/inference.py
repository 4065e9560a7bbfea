"""Model calls of the evaluation: batched generation, and rank classification against a cached prefix.

Rank classification (OpenFlamingo's method, made fast): the prompt and its images are encoded once; the log-prob of
every class name's first token comes from the prefix's last logits; classes with more tokens continue from the
cached prefix, many classes per call: the batch of B prefixes is expanded to B x K rows (the KV cache and the
visual tokens alike) and K class names are scored in one forward pass. OpenFlamingo runs one forward per class
name and token instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from PIL import Image

from ..model.inputs import prepare_inputs, to_device
from ..model.language import forward_accepts
from .prompts import Prompt
from .tasks import Decoding


def open_images(prompts: Sequence[Prompt]) -> list[list[Image.Image]]:
    images = []
    for prompt in prompts:
        sample = []
        for path in prompt.images:
            try:
                with Image.open(path) as image:
                    sample.append(image.convert("RGB"))
            except OSError as error:
                raise ValueError(f"{path}: cannot read image ({error})") from None
        images.append(sample)
    return images


def model_inputs(model, prompts: Sequence[Prompt], device: torch.device) -> dict:
    inputs = prepare_inputs(model, [p.text for p in prompts], open_images(prompts), padding_side="left")
    return to_device(inputs, device)


@torch.no_grad()
def generate(model, prompts: Sequence[Prompt], decoding: Decoding, device: torch.device) -> list[str]:
    """Greedy/beam generation for a batch of left-padded prompts; returns the new text of each (special tokens
    dropped). Generation stops at <|endofchunk|>; image keys/values are computed once per batch."""
    inputs = model_inputs(model, prompts, device)
    output = model.generate(
        **inputs,
        max_new_tokens=decoding.max_new_tokens,
        min_new_tokens=decoding.min_new_tokens,
        num_beams=decoding.num_beams,
        length_penalty=decoding.length_penalty,
        do_sample=False,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return model.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def tokenize_class_names(tokenizer, names: Sequence[str]) -> list[list[int]]:
    """Class names as the continuation of "...Answer:" (no special tokens, as OpenFlamingo tokenizes them)."""
    ids = tokenizer(list(names), add_special_tokens=False)["input_ids"]
    for name, tokens in zip(names, ids, strict=True):
        if not tokens:
            raise ValueError(f"class name {name!r} tokenizes to nothing")
    return ids


class PrefixCache:
    """The KV cache of the prompts, expanded to B x K rows and reset to the prompt after each continuation call.

    transformers 5 calls the cache argument/output `cache`, 4.x `past_key_values`; Cache objects grow in place
    (cropped back after each call), legacy tuples do not; caches with sliding-window layers are copied instead."""

    def __init__(self, language_model, output, prefix_length: int):
        self.argument = "cache" if forward_accepts(language_model, "cache") else "past_key_values"
        self.cache = getattr(output, "cache", None) or output.past_key_values
        self.prefix_length = prefix_length
        sliding = getattr(self.cache, "is_sliding", None)
        self.croppable = hasattr(self.cache, "crop") and not (isinstance(sliding, list) and any(sliding))

    def expand(self, repeats: int) -> None:
        if isinstance(self.cache, tuple):
            self.cache = tuple(
                tuple(t.repeat_interleave(repeats, dim=0) for t in layer) for layer in self.cache
            )
        else:
            self.cache.batch_repeat_interleave(repeats)

    def for_call(self) -> dict:
        cache = self.cache if self.croppable or isinstance(self.cache, tuple) else copy.deepcopy(self.cache)
        return {self.argument: cache}

    def reset(self) -> None:
        # A negative crop removes that many tokens in transformers 4.x and 5.x alike (5.x refuses positive ones).
        grown = self.cache.get_seq_length() - self.prefix_length if self.croppable else 0
        if grown > 0:
            self.cache.crop(-grown)


@torch.no_grad()
def rank_classes(
    model,
    prompts: Sequence[Prompt],
    class_token_ids: Sequence[Sequence[int]],
    device: torch.device,
    rows_per_call: int = 64,
    length_normalize: bool = True,
) -> torch.Tensor:
    """Log-likelihood of every class name after every prompt: (B, C), averaged over the class-name tokens when
    `length_normalize` (OpenFlamingo's choice for classification), summed otherwise."""
    inputs = model_inputs(model, prompts, device)
    return rank_classes_from_tensors(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["images"], class_token_ids, rows_per_call,
        length_normalize, inputs["num_images"],
    )  # fmt: skip


@torch.no_grad()
def rank_classes_from_tensors(
    model,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    images: torch.Tensor | None,
    class_token_ids: Sequence[Sequence[int]],
    rows_per_call: int = 64,
    length_normalize: bool = True,
    num_images: Sequence[int] | None = None,
) -> torch.Tensor:
    """`rank_classes` for left-padded token ids and images (B, T_img, F, C, H, W) that are already tensors;
    `num_images` (real images per prompt) skips encoding the padding slots."""
    batch = input_ids.shape[0]
    # Longer class names continue from the cached prefix, similar lengths together to limit padding.
    longer = sorted(
        (c for c, t in enumerate(class_token_ids) if len(t) > 1), key=lambda c: len(class_token_ids[c])
    )
    per_call = max(1, min(len(longer), rows_per_call // batch))
    # Every call has the same K rows per prompt (the last chunk repeats its last class), so the media context
    # expands the visual tokens once and reuses their keys/values for all calls.
    chunks = [longer[start : start + per_call] for start in range(0, len(longer), per_call)]
    padded = [chunk + [chunk[-1]] * (per_call - len(chunk)) for chunk in chunks]
    first_tokens = torch.tensor([[t[0] for t in class_token_ids]] * batch)
    calls = [[class_token_ids[c] for _ in range(batch) for c in chunk] for chunk in padded]
    first, continued = _score_continuations(model, input_ids, mask, images, num_images, first_tokens, calls)
    scores = first
    for chunk, sums in zip(chunks, continued, strict=True):
        scores[:, chunk] += sums[:, : len(chunk)]
    if length_normalize:
        scores = scores / torch.tensor([len(t) for t in class_token_ids], dtype=torch.float32)
    return scores


@torch.no_grad()
def rank_choices(
    model,
    prompts: Sequence[Prompt],
    choice_token_ids: Sequence[Sequence[Sequence[int]]],
    device: torch.device,
    length_normalize: bool = True,
) -> torch.Tensor:
    """Log-likelihood of each prompt's own K answer choices (B, K), e.g. the two names of a binding prompt; the
    prompt is encoded once and every choice continues from its cached keys/values."""
    counts = {len(choices) for choices in choice_token_ids}
    if len(counts) != 1:
        raise ValueError(f"every prompt needs the same number of choices, got {sorted(counts)}")
    inputs = model_inputs(model, prompts, device)
    first_tokens = torch.tensor([[t[0] for t in choices] for choices in choice_token_ids])
    rows = [tokens for choices in choice_token_ids for tokens in choices]
    calls = [rows] if any(len(t) > 1 for t in rows) else []
    first, continued = _score_continuations(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["images"], inputs["num_images"],
        first_tokens, calls,
    )  # fmt: skip
    scores = first + continued[0] if calls else first
    if length_normalize:
        scores = scores / torch.tensor([[len(t) for t in choices] for choices in choice_token_ids]).float()
    return scores


def _score_continuations(model, input_ids, mask, images, num_images, first_tokens, calls):
    """Log p(first answer token | prompt) for `first_tokens` (B, K), and for each call (B * K' token lists, prompt-
    major) the summed log-probs of the tokens after the first, continuing from the prompts' cache: (B, K') each."""
    device = input_ids.device
    batch, prefix_length = input_ids.shape
    lm = model.language_model
    extra = {"logits_to_keep": 1} if forward_accepts(lm, "logits_to_keep") else {}
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    takes_positions = forward_accepts(lm, "position_ids")
    # Text-only prompts (images None) run the plain LM, as Flamingo.forward does without images.
    media = nullcontext() if images is None else model.media(model.encode_images(images, num_images))
    with media:
        out = lm(
            input_ids=input_ids,
            attention_mask=mask,
            use_cache=True,
            **({"position_ids": positions} if takes_positions else {}),
            **extra,
        )
        logprobs = F.log_softmax(out.logits[:, -1].float(), dim=-1)
        first = logprobs.gather(1, first_tokens.to(device)).cpu()
        continued = []
        if calls:
            per_prompt = len(calls[0]) // batch
            cache = PrefixCache(lm, out, prefix_length)
            cache.expand(per_prompt)
            prefix_mask = mask.repeat_interleave(per_prompt, dim=0)
            last_position = positions[:, -1].repeat_interleave(per_prompt, dim=0)
            for rows in calls:
                sums = continuation_logprobs(model, cache, rows, prefix_mask, last_position, takes_positions)
                continued.append(sums.view(batch, per_prompt).cpu())
                cache.reset()
    return first, continued


def continuation_logprobs(model, cache, rows, prefix_mask, last_position, takes_positions) -> torch.Tensor:
    """Sum of log p(token j+1 | prefix, tokens <= j) over each row's tokens after the first: (len(rows),), one row
    per cached prefix row."""
    device = prefix_mask.device
    width = max(max(len(tokens) - 1 for tokens in rows), 1)
    inputs = torch.full((len(rows), width), model.special_ids.pad, dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, tokens in enumerate(rows):
        inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1], dtype=torch.long)
        targets[row, : len(tokens) - 1] = torch.tensor(tokens[1:], dtype=torch.long)
        real[row, : len(tokens) - 1] = True
    inputs, targets, real = inputs.to(device), targets.to(device), real.to(device)
    attention = torch.cat([prefix_mask, real.to(prefix_mask.dtype)], dim=1)
    kwargs = (
        {"position_ids": last_position[:, None] + torch.arange(1, width + 1, device=device)}
        if takes_positions
        else {}
    )
    logits = model.language_model(
        input_ids=inputs, attention_mask=attention, use_cache=True, **cache.for_call(), **kwargs
    ).logits
    logprobs = logits.float().gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(
        logits.float(), dim=-1
    )
    return (logprobs * real).sum(-1)
