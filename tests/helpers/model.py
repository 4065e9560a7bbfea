"""Model builders: tiny Flamingo configs and models over tiny.py's LMs, their batches and packed rows, and the
checks that find a tensor left off the model's device."""

from __future__ import annotations

import torch
from tiny import TINY_CLIP, lm_config
from transformers import AutoTokenizer

from openflamingo import CrossAttentionConfig, FlamingoConfig, PerceiverConfig, VisionConfig, build_flamingo


def tiny_config(tokenizer_dir, family="llama", **cross_attention) -> FlamingoConfig:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return FlamingoConfig(
        language_model_config=lm_config(family, tokenizer),
        tokenizer=str(tokenizer_dir),
        vision=VisionConfig("hf_clip", config=TINY_CLIP),
        perceiver=PerceiverConfig(depth=2, num_latents=4, heads=2, dim_head=8, max_num_frames=2),
        cross_attention=CrossAttentionConfig(
            **{"every_n_layers": 2, "heads": 2, "dim_head": 8, "gate_init": 0.5, **cross_attention}
        ),
    )


def batch(model, texts, num_images, frames=1, seed=0):
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(len(texts), max(num_images), frames, 3, 32, 32, generator=generator)
    return dict(
        input_ids=encoded.input_ids,
        attention_mask=encoded.attention_mask,
        images=images,
        num_images=num_images,
    )


TEXTS = ["<image>a red cat sits<|endofchunk|><image>a dog", "question <image>the sky"]


def tiny_model(tokenizer_dir, family="llama"):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = FlamingoConfig(
        language_model_config=lm_config(family, tokenizer),
        tokenizer=str(tokenizer_dir),
        vision=VisionConfig("hf_clip", config=TINY_CLIP),
        perceiver=PerceiverConfig(depth=1, num_latents=4, heads=2, dim_head=8),
        cross_attention=CrossAttentionConfig(every_n_layers=2, heads=2, dim_head=8, gate_init=0.5),
    )
    return build_flamingo(config, seed=0).eval()


def perturbed(model):
    """Every trainable tensor moved away from its init, so a tensor that fails to load would show."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model


def packed_batch(model, seed=0):
    """Two rows: three documents + padding, and two documents filling the row."""
    tokenize = lambda text: model.tokenizer(text, return_tensors="pt").input_ids[0]  # noqa: E731
    docs = [
        [
            tokenize("<image>a red cat<|endofchunk|>"),
            tokenize("two <image>dogs run<|endofchunk|>"),
            tokenize("hi"),
        ],
        [tokenize("<image>the sky<|endofchunk|><image>is blue"), tokenize("question <image>what")],
    ]
    length = max(sum(len(d) for d in row) for row in docs) + 2
    input_ids = torch.full((2, length), model.special_ids.pad)
    document_ids = torch.zeros(2, length, dtype=torch.long)
    for r, row in enumerate(docs):
        at = 0
        for number, doc in enumerate(row, start=1):
            input_ids[r, at : at + len(doc)] = doc
            document_ids[r, at : at + len(doc)] = number
            at += len(doc)
    images = torch.randn(2, 3, 1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    labels = input_ids.masked_fill(document_ids == 0, -100)
    return dict(
        input_ids=input_ids, images=images, num_images=[2, 3], document_ids=document_ids, labels=labels
    )


def loss_and_grads(model, inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


META = torch.device("meta")


class ReachedModel(BaseException):
    """Raised by the checks once the model got its inputs, all on the right device: nothing more to run. (Not an
    Exception: nothing on the way may swallow it, e.g. the FLOP count that must never stop a run.)"""


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)


def assert_on(device: torch.device, where: str, *values) -> None:
    for tensor in tensors(values):
        assert tensor.device == device, f"{where}: a {tuple(tensor.shape)} tensor is on {tensor.device}"
    raise ReachedModel(where)
