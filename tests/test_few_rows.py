"""Decode-step products of a few rows, reordered for CPU BLAS (model/few_rows.py): the same values to rounding, the
same generated tokens, and only where they apply (CPU, 2 to MAX_ROWS rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.model import TEXTS, batch, tiny_config

import openflamingo.model.few_rows as few_rows
from openflamingo import build_flamingo


@pytest.mark.parametrize("shape", [(3, 40), (2, 2, 40), (1, 40), (40, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_few_row_products_equal_linear(shape, bias):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(*shape, generator=generator), torch.randn(24, 40, generator=generator)
    b = torch.randn(24, generator=generator) if bias else None
    with few_rows.FewRowLinear():
        reordered = F.linear(x, weight, b)
    torch.testing.assert_close(reordered, F.linear(x, weight, b), atol=1e-5, rtol=1e-6)


def test_generation_gives_the_same_tokens_and_uses_the_reordered_products(tokenizer_dir, monkeypatch):
    monkeypatch.setattr(few_rows, "reordering_pays", lambda: True)  # the CPUs it is on for (AMD's)
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0).eval()
    inputs = batch(model, TEXTS, [2, 1])
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    reordered = model.generate(**inputs, **greedy)
    logits, state = model.prefill(**inputs)
    step = model.decode_step(state, logits.argmax(-1))

    calls = []
    original = few_rows.FewRowLinear.__torch_function__
    monkeypatch.setattr(
        few_rows.FewRowLinear, "__torch_function__", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model.generate(**inputs, max_new_tokens=2)
    assert calls  # the mode is on during generation on such a CPU
    calls.clear()
    monkeypatch.setattr(few_rows, "reordering_pays", lambda: False)
    model.generate(**inputs, max_new_tokens=2)
    assert not calls  # and off on others
    monkeypatch.setattr(few_rows, "reordering_pays", lambda: True)

    monkeypatch.setattr(few_rows, "MAX_ROWS", 0)  # every product as F.linear computes it
    assert torch.equal(model.generate(**inputs, **greedy), reordered)
    logits, state = model.prefill(**inputs)
    torch.testing.assert_close(model.decode_step(state, logits.argmax(-1)), step, atol=1e-5, rtol=0)
