"""Model calls of the evaluation: batched generation, and rank classification against a cached prefix.

Rank classification (OpenFlamingo's method, made fast): the prompt and its images are encoded once; the log-prob of
every class name's first token comes from the prefix's last logits; classes with more tokens continue from the
cached prefix (`Flamingo.prefill`), many classes per call: the B prefixes are forked to B x K rows (the KV cache and
the media state alike) and K class names are scored in one `decode_step`. OpenFlamingo runs one forward per class
name and token instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from ..model.inputs import prepare_inputs, to_device
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
                raise InputError(f"{path}: cannot read image ({error})") from None
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
            raise InputError(f"class name {name!r} tokenizes to nothing")
    return ids


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
    chunks = [longer[start : start + per_call] for start in range(0, len(longer), per_call)]
    first_tokens = torch.tensor([[t[0] for t in class_token_ids]] * batch)
    calls = [[class_token_ids[c] for _ in range(batch) for c in chunk] for chunk in chunks]
    first, continued = _score_continuations(model, input_ids, mask, images, num_images, first_tokens, calls)
    scores = first
    for chunk, sums in zip(chunks, continued, strict=True):
        scores[:, chunk] += sums
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
        raise InputError(f"every prompt needs the same number of choices, got {sorted(counts)}")
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
    logits, prompts = model.prefill(input_ids, mask, images, num_images)
    logprobs = F.log_softmax(logits.float(), dim=-1)
    first = logprobs.gather(1, first_tokens.to(logprobs.device)).cpu()
    continued = []
    for rows in calls:
        per_prompt = len(rows) // len(prompts)
        sums = continuation_logprobs(model, prompts.fork(per_prompt), rows)
        continued.append(sums.view(len(prompts), per_prompt).cpu())
    return first, continued


def continuation_logprobs(model, state, rows) -> torch.Tensor:
    """Sum of log p(token j+1 | prefix, tokens <= j) over each row's tokens after the first: (len(rows),), one row
    per row of `state` (the prefixes, consumed: fork them first)."""
    device = state.mask.device
    width = max(max(len(tokens) - 1 for tokens in rows), 1)
    inputs = torch.full((len(rows), width), model.special_ids.pad, dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, tokens in enumerate(rows):
        inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1], dtype=torch.long)
        targets[row, : len(tokens) - 1] = torch.tensor(tokens[1:], dtype=torch.long)
        real[row, : len(tokens) - 1] = True
    inputs, targets, real = inputs.to(device), targets.to(device), real.to(device)
    logits = model.decode_step(state, inputs, real.long(), all_logits=True).float()
    logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (logprobs * real).sum(-1)
