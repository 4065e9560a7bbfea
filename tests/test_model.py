"""Flamingo over every supported LM family: forward, loss, masking, generation and bad-input errors."""

import pytest
import torch
from helpers.model import TEXTS, batch, tiny_config
from tiny import FAMILIES

from openflamingo import CrossAttentionConfig, PerceiverConfig, build_flamingo
from openflamingo.model.cross_attention import MaskedCrossAttention, media_attention_mask
from openflamingo.model.flamingo import next_token_targets
from openflamingo.model.perceiver import PerceiverResampler


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_and_generates_identically_with_and_without_cache(tokenizer_dir, family):
    model = build_flamingo(tiny_config(tokenizer_dir, family), seed=0)
    inputs = batch(model, TEXTS, [2, 1])
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (*inputs["input_ids"].shape, model.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("perceiver.", "cross_attn_blocks.", "added_tokens.")) for n in trainable
    )
    assert all(model.get_parameter(n).grad is not None for n in trainable if "gate" in n)

    # Training computes logits only where a label follows: the same values, and the same loss.
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[0, :5] = -100
    positions, targets = next_token_targets(labels)
    selected = model(**inputs, logits_at=positions).logits
    full = model(**inputs, labels=labels)
    torch.testing.assert_close(selected, full.logits[positions], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.nn.functional.cross_entropy(selected, targets), full.loss)

    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = model.generate(**inputs, **greedy)
    uncached = model.generate(**inputs, **greedy, use_cache=False)
    assert torch.equal(cached, uncached)
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 4
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5, num_return_sequences=3)
    assert sampled.shape[0] == 6


def test_fresh_model_computes_exactly_the_frozen_lm(tokenizer_dir):
    model = build_flamingo(tiny_config(tokenizer_dir, gate_init=0.0), seed=0).eval()
    inputs = batch(model, ["a cat <image>sits on a mat"], [1])
    inputs["attention_mask"] = None
    flamingo_logits = model(**inputs).logits
    plain_ids = inputs["input_ids"].clamp(max=model.special_ids.first_added - 1)
    lm_logits = model.language_model(input_ids=plain_ids).logits
    first_image = int((inputs["input_ids"][0] == model.special_ids.media).nonzero()[0])
    n = model.special_ids.first_added
    assert torch.equal(flamingo_logits[0, :first_image, :n], lm_logits[0, :first_image, :n])


def test_tokens_before_the_first_image_ignore_the_images(tokenizer_dir):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0).eval()
    inputs = batch(model, ["some text first <image>a cat"], [1])
    first_image = int((inputs["input_ids"][0] == model.special_ids.media).nonzero()[0])
    logits_a = model(**inputs).logits
    logits_b = model(**{**inputs, "images": torch.randn_like(inputs["images"])}).logits
    assert torch.equal(logits_a[0, :first_image], logits_b[0, :first_image])
    assert not torch.allclose(logits_a[0, first_image:], logits_b[0, first_image:])


@pytest.mark.parametrize("immediate", [True, False])
def test_text_attends_to_its_own_image_or_all_previous(immediate):
    torch.manual_seed(0)
    attn = MaskedCrossAttention(dim=8, dim_visual=6, cfg=CrossAttentionConfig(heads=2, dim_head=4))
    text_time = torch.tensor([[0, 1, 1, 2, 2]])  # token 0 before any image, tokens 3-4 after the second
    media = torch.randn(1, 2, 3, 6)
    x = torch.randn(1, 5, 8)

    def run(media):
        keys, values = attn.media_keys_values(media)
        return attn(x, keys, values, media_attention_mask(text_time, None, 2, 3, immediate))

    changed_first = media.clone()
    changed_first[:, 0] += 1
    out, out_changed = run(media), run(changed_first)
    assert torch.equal(out[0, 0], attn.to_out(torch.zeros(8)))  # no image yet: zero attention output
    assert not torch.allclose(out[0, 1:3], out_changed[0, 1:3])
    assert torch.equal(out[0, 3:], out_changed[0, 3:]) == immediate


def test_video_frames_need_frame_embeddings(tokenizer_dir):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0)
    inputs = batch(model, TEXTS, [2, 1], frames=2)
    assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)
    with pytest.raises(ValueError, match="3 frames per image but the perceiver supports 2"):
        model(**batch(model, TEXTS, [2, 1], frames=3))


def test_bad_inputs_are_clear_errors(tokenizer_dir):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0)
    inputs = batch(model, TEXTS, [2, 1])
    with pytest.raises(ValueError, match="sample 1 has 1 <image> tokens for 2 images"):
        model(**{**inputs, "num_images": None})
    with pytest.raises(ValueError, match="sample 0 has 2 <image> tokens but only 1 images"):
        model(**{**inputs, "num_images": [1, 1]})
    with pytest.raises(ValueError, match=r"images must be a float tensor \(B, T_img, F, C, H, W\)"):
        model(**{**inputs, "images": inputs["images"][:, :, 0]})
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(**{**inputs, "input_ids": inputs["input_ids"].float()})
    with pytest.raises(ValueError, match="no images were given"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, "):
        model(**{**inputs, "input_ids": inputs["input_ids"] + 10_000})


def test_unknown_decoder_layout_names_the_paths_tried(tokenizer_dir):
    from openflamingo.model.language import find_decoder_layers

    lm = build_flamingo(tiny_config(tokenizer_dir), seed=0).language_model
    lm.model.layers = torch.nn.Sequential(*lm.model.layers)  # no longer a ModuleList anywhere
    with pytest.raises(ValueError, match="tried model.layers, model.decoder.layers.*decoder_layers_path="):
        find_decoder_layers(lm)


def test_image_keys_and_values_are_computed_once_per_generate(tokenizer_dir, monkeypatch):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0)
    calls = []
    for block in model.cross_attn_blocks.values():
        original = block.attn.media_keys_values
        monkeypatch.setattr(
            block.attn, "media_keys_values", lambda media, f=original: calls.append(1) or f(media)
        )
    model.generate(**batch(model, TEXTS, [2, 1]), max_new_tokens=5, min_new_tokens=5)
    assert len(calls) == len(model.cross_attn_blocks)


def test_training_mode_leaves_frozen_backbones_in_eval_mode(tokenizer_dir):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0).train()
    assert model.perceiver.training and model.cross_attn_blocks.training
    assert not model.language_model.training and not model.vision_encoder.training


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"mpt"}))
@pytest.mark.parametrize("immediate", [True, False])
def test_packed_documents_compute_what_they_compute_alone(tokenizer_dir, family, immediate):
    model = build_flamingo(
        tiny_config(tokenizer_dir, family, only_attend_immediate_media=immediate), seed=0
    ).eval()
    first = model.tokenizer("<image>a red cat<|endofchunk|><image>two dogs", return_tensors="pt").input_ids
    second = model.tokenizer("question <image>the sky<|endofchunk|>", return_tensors="pt").input_ids
    images_first, images_second = torch.randn(1, 2, 1, 3, 32, 32), torch.randn(1, 1, 1, 3, 32, 32)
    alone_first = model(input_ids=first, images=images_first).logits[0]
    alone_second = model(input_ids=second, images=images_second).logits[0]

    padding = torch.full((1, 3), model.special_ids.pad)
    packed_ids = torch.cat([first, second, padding], dim=1)
    document_ids = torch.cat(
        [torch.ones_like(first), torch.full_like(second, 2), torch.zeros_like(padding)], dim=1
    )
    packed = model(
        input_ids=packed_ids,
        images=torch.cat([images_first, images_second], dim=1),
        num_images=[3],
        document_ids=document_ids,
        labels=packed_ids,
    )
    n1, n2 = first.shape[1], second.shape[1]
    torch.testing.assert_close(packed.logits[0, :n1], alone_first, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.logits[0, n1 : n1 + n2], alone_second, atol=1e-5, rtol=0)
    assert torch.isfinite(packed.loss)


def test_packing_an_lm_without_position_ids_is_a_clear_error(tokenizer_dir):
    model = build_flamingo(tiny_config(tokenizer_dir, "mpt"), seed=0)
    inputs = batch(model, TEXTS, [2, 1])
    with pytest.raises(ValueError, match="MptForCausalLM takes no position_ids, so packed documents cannot"):
        model(**inputs, document_ids=inputs["attention_mask"])


def test_small_latent_init_lets_the_perceiver_output_follow_the_image():
    media = torch.randn(16, 1, 1, 9, 256, generator=torch.Generator().manual_seed(0))

    def spread_across_images(std: float) -> float:
        torch.manual_seed(0)
        perceiver = PerceiverResampler(256, PerceiverConfig(depth=1, num_latents=8, latent_init_std=std))
        assert abs(perceiver.latents.std().item() - std) < 0.1 * std
        with torch.no_grad():
            out = perceiver(media)
        return (out.std(0).mean() / out.std()).item()

    # OpenFlamingo's N(0, 1) latents swamp the image-dependent part of the output.
    assert spread_across_images(0.02) > 3 * spread_across_images(1.0)


def test_padding_image_slots_are_not_encoded_and_change_nothing(tokenizer_dir, monkeypatch):
    """A batch with fewer images in some samples encodes only the real ones, and each sample computes what it
    computes alone."""
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0).eval()
    inputs = batch(model, TEXTS, [2, 1])
    encoded = []
    vision = model.vision_encoder.forward
    monkeypatch.setattr(model.vision_encoder, "forward", lambda x: encoded.append(len(x)) or vision(x))
    together = model(**inputs).logits
    assert encoded == [3]  # not 4: the second sample's padding slot is skipped
    for b in range(2):
        length = int(inputs["attention_mask"][b].sum())
        alone = model(
            input_ids=inputs["input_ids"][b : b + 1, -length:],
            images=inputs["images"][b : b + 1, : inputs["num_images"][b]],
        ).logits
        torch.testing.assert_close(together[b : b + 1, -length:], alone, rtol=1e-5, atol=1e-5)
