"""The training loss from the head's inputs, a chunk at a time (model/loss.py), equals the cross-entropy of the full
logits: value and every gradient, in fp32, over heads with and without bias, tied or not, frozen or trained."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers.model import TEXTS, batch, tiny_config

import openflamingo.model.loss as loss_module
from openflamingo import build_flamingo
from openflamingo.model.flamingo import next_token_targets


def losses_and_grads(model, inputs, positions, targets, fused: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout draws (a trained LM runs in train mode)
    flat = positions.flatten().nonzero().squeeze(1)
    if fused:
        loss = model(**inputs, logits_at=flat, targets=targets).loss_sum
    else:
        logits = model(**inputs, logits_at=flat).logits
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "family, train_lm",
    [("llama", False), ("gpt2", False), ("phi", False), ("opt", True), ("phi", True)],
    ids=["llama", "gpt2-tied", "phi-bias", "opt-trained-head", "phi-trained-head"],
)
def test_chunked_loss_and_gradients_equal_the_full_logits_cross_entropy(
    tokenizer_dir, family, train_lm, monkeypatch
):
    config = dataclasses.replace(tiny_config(tokenizer_dir, family), train_language_model=train_lm)
    model = build_flamingo(config, seed=0).train()
    inputs = batch(model, TEXTS, [2, 1])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    positions, targets = next_token_targets(labels)
    assert (
        targets >= model.special_ids.first_added
    ).any()  # added tokens among the targets: both halves count
    monkeypatch.setattr(loss_module, "CHUNK_POSITIONS", 5)  # several chunks, the last one short
    dense_loss, dense_grads = losses_and_grads(model, inputs, positions, targets, fused=False)
    fused_loss, fused_grads = losses_and_grads(model, inputs, positions, targets, fused=True)
    torch.testing.assert_close(fused_loss, dense_loss, atol=1e-5, rtol=1e-6)
    assert fused_grads.keys() == dense_grads.keys()
    if train_lm:
        assert "language_model.lm_head.weight" in fused_grads or any("embed" in n for n in fused_grads)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(
            fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_the_loss_alone_needs_no_gradient(tokenizer_dir):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0).eval()
    inputs = batch(model, TEXTS, [2, 1])
    positions, targets = next_token_targets(
        inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    )
    flat = positions.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        fused = model(**inputs, logits_at=flat, targets=targets)
        logits = model(**inputs, logits_at=flat).logits
    assert fused.logits is None and not fused.loss_sum.requires_grad
    torch.testing.assert_close(fused.loss_sum, F.cross_entropy(logits, targets, reduction="sum"))
    with pytest.raises(ValueError, match="pass both"):
        model(**inputs, targets=targets)
