"""Packed rows attend per document (SDPA with is_causal on each document's span) instead of under a dense
(B, 1, L, L) mask: the same loss and gradients as the dense mask, no mask built, and unpacked calls unchanged."""

import pytest
import torch
import torch.nn.functional as F
from helpers.model import loss_and_grads, packed_batch, tiny_config

from openflamingo import build_flamingo
from openflamingo.model import flamingo as flamingo_module
from openflamingo.model.packing import (
    DOCUMENT_ATTENTION,
    document_attention,
    document_spans,
    packed_attention_mask,
)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_per_document_attention_gives_the_dense_masks_loss_and_gradients(tokenizer_dir, family, monkeypatch):
    torch.manual_seed(0)
    model = build_flamingo(tiny_config(tokenizer_dir, family), seed=0)
    model.language_model.requires_grad_(True)  # the LM's own gradients go through the attention too
    assert model.language_model.config._attn_implementation == DOCUMENT_ATTENTION
    inputs = packed_batch(model)

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a dense mask was built for a packed batch")

    with monkeypatch.context() as patch:
        patch.setattr(flamingo_module, "packed_attention_mask", no_dense_mask)
        loss, grads = loss_and_grads(model, inputs)

    model.language_model.set_attn_implementation("sdpa")  # the dense (B, 1, L, L) mask path
    dense_loss, dense_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(loss, dense_loss, atol=1e-5, rtol=0)
    assert grads.keys() == dense_grads.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads[name], dense_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_unpacked_calls_and_generation_are_transformers_sdpa(tokenizer_dir):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0).eval()
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    encoded = tokenizer(["<image>a red cat sits", "<image>the"], return_tensors="pt", padding=True)
    images = torch.randn(2, 1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    args = dict(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask, images=images)
    with torch.no_grad():
        ours = model(**args).logits
        tokens = model.generate(**args, max_new_tokens=6, do_sample=False)
        model.language_model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(**args).logits, ours, atol=0, rtol=0)
        assert model.generate(**args, max_new_tokens=6, do_sample=False).tolist() == tokens.tolist()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_document_attention_equals_sdpa_under_the_block_diagonal_mask(kv_heads):
    generator = torch.Generator().manual_seed(0)
    document_ids = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2]])
    query = torch.randn(2, 4, 8, 16, generator=generator)
    key, value = (torch.randn(2, kv_heads, 8, 16, generator=generator) for _ in range(2))
    out, _ = document_attention(None, query, key, value, None, document_spans=document_spans(document_ids))
    mask = packed_attention_mask(document_ids, torch.float32)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=kv_heads != 4)
    real = (document_ids != 0)[..., None, None]  # padding differs: it sees its own run, not only itself
    torch.testing.assert_close(out * real, expected.transpose(1, 2) * real, atol=1e-6, rtol=0)


def test_spans_are_the_runs_of_each_row():
    ids = torch.tensor([[1, 1, 2, 0], [1, 1, 1, 1]])
    assert document_spans(ids) == [[(0, 2), (2, 3), (3, 4)], [(0, 4)]]
