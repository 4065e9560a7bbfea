"""With only_attend_immediate_media each token sees one image: runs of tokens attend to their image's visual tokens
alone (ImageSpans) instead of all of the row's under a mask, with the mask's loss and gradients."""

import pytest
import torch
import torch.nn.functional as F
from helpers.model import batch, loss_and_grads, packed_batch, tiny_config

from openflamingo import build_flamingo
from openflamingo.model import media as media_module
from openflamingo.model.cross_attention import ImageSpans, attend_per_image, image_spans, media_attention_mask


def test_spans_are_the_runs_of_each_tokens_image():
    text_time = torch.tensor([[0, 1, 1, 2, 2, 0, 3], [1, 1, 1, 1, 1, 1, 1]])
    assert image_spans(text_time, 4) == ImageSpans(
        [[(0, 1, 0), (1, 3, 1), (3, 5, 2), (5, 6, 0), (6, 7, 3)], [(0, 7, 1)]], 4
    )


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attending_per_image_equals_the_masked_attention_over_all_images(kv_heads):
    generator = torch.Generator().manual_seed(0)
    text_time = torch.tensor([[0, 1, 1, 2, 2, 0, 3, 3], [2, 2, 2, 3, 3, 1, 1, 1]])
    num_media, n = 3, 5
    q = torch.randn(2, 4, 8, 16, generator=generator)
    keys, values = (torch.randn(2, kv_heads, num_media * n, 16, generator=generator) for _ in range(2))
    out = attend_per_image(q, keys, values, image_spans(text_time, n))
    mask = media_attention_mask(text_time, None, num_media, n, immediate=True)
    has_media = mask.any(-1, keepdim=True)
    expected = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask | ~has_media, enable_gqa=kv_heads != 4
    )
    torch.testing.assert_close(out, expected * has_media, atol=1e-6, rtol=0)


def with_dense_mask(monkeypatch, num_media):
    """Make MediaState.place build the (B, 1, L, T*n) mask where it would build spans."""
    monkeypatch.setattr(
        media_module,
        "image_spans",
        lambda text_time, n: media_attention_mask(text_time, None, num_media, n, immediate=True),
    )


@pytest.mark.parametrize("packed", [False, True])
def test_blocks_give_the_dense_masks_loss_and_gradients(tokenizer_dir, packed, monkeypatch):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0)
    if packed:
        inputs = packed_batch(model)
    else:
        inputs = batch(
            model, ["<image>a red cat<|endofchunk|><image>a dog", "question <image>the sky"], [2, 1]
        )
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    spans = []
    original = media_module.image_spans
    with monkeypatch.context() as patch:
        patch.setattr(media_module, "image_spans", lambda *args: spans.append(1) or original(*args))
        loss, grads = loss_and_grads(model, inputs)
    assert len(spans) == 1  # placed once per forward, shared by every block
    with monkeypatch.context() as patch:
        with_dense_mask(patch, inputs["images"].shape[1])
        dense_loss, dense_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(loss, dense_loss, atol=1e-5, rtol=0)
    assert grads.keys() == dense_grads.keys() and any("to_kv" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], dense_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_generation_is_the_same_with_spans_and_with_the_mask(tokenizer_dir, monkeypatch):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0).eval()
    inputs = batch(model, ["<image>a red cat<|endofchunk|><image>a dog", "question <image>the sky"], [2, 1])
    tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with_dense_mask(monkeypatch, inputs["images"].shape[1])
    assert model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist() == tokens.tolist()
