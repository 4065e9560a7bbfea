"""Self-checks of tests/idefics_reference.py, the reference side of the IDEFICS converter's parity tests: the saved
Hub layouts reload to the same model, generation is cache-consistent, the images matter, and the image mask is
what IdeficsProcessor computes."""

import itertools
import json

import pytest
import torch
from idefics_reference import (
    FLAT_PERCEIVER_KEYS,
    FLAT_VISION_KEYS,
    build_idefics,
    idefics_config,
    image_attention_mask,
    make_idefics_tokenizer,
    make_prompt,
    reference_generate,
    reference_logits,
    save_hub_layout,
)
from safetensors import safe_open
from transformers import IdeficsForVisionText2Text, IdeficsImageProcessor

IMAGE = object()  # make_prompt takes any non-str item as an image
# every gate type x qk norms on/off x interval, with all four (qk_layer_norms, qk_layer_norms_perceiver) pairs
OPTIONS = [
    (alpha_type, qk, qk == (alpha_type == "float"), interval)
    for alpha_type, qk, interval in itertools.product(["float", "vector"], [False, True], [1, 2])
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_idefics_tokenizer(tmp_path_factory.mktemp("idefics_tokenizer"))


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Two left-padded prompts: two images with an EOS between them, and one image after some text."""
    samples = [
        ["User:", IMAGE, "a cat sits on the mat", "</s>", "the dog", IMAGE, "a red car"],
        ["two", "birds", IMAGE, "fly"],
    ]
    input_ids, attention_mask = make_prompt(tokenizer, samples)
    pixel_values = torch.randn(2, 2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return input_ids, attention_mask, pixel_values


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_idefics(idefics_config(tokenizer, alpha_type="vector", cross_layer_interval=2), seed=1)


@pytest.mark.parametrize("alpha_type, qk, qk_perceiver, interval", OPTIONS)
def test_hub_layouts_reload_to_the_same_logits(
    tokenizer, batch, tmp_path, alpha_type, qk, qk_perceiver, interval
):
    config = idefics_config(
        tokenizer,
        alpha_type=alpha_type,
        qk_layer_norms=qk,
        qk_layer_norms_perceiver=qk_perceiver,
        cross_layer_interval=interval,
    )
    model = build_idefics(config, seed=0)
    state = model.state_dict()
    assert state["model.gated_cross_attn_layers.0.alpha_dense"].shape == (
        (1,) if alpha_type == "float" else (1, 1, 64)
    )
    assert f"model.gated_cross_attn_layers.{4 // interval - 1}.alpha_dense" in state
    assert f"model.gated_cross_attn_layers.{4 // interval}.alpha_dense" not in state
    assert ("model.gated_cross_attn_layers.0.cross_attn.q_layer_norm.weight" in state) == qk
    assert ("model.perceiver_resampler.blocks.0.0.q_layer_norm.weight" in state) == qk_perceiver

    nested = save_hub_layout(model, tokenizer, tmp_path / "nested")
    index = json.loads((nested / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    saved = {}
    for shard in shards:
        with safe_open(nested / shard, "pt") as file:
            saved.update({name: file.get_tensor(name) for name in file.keys()})
    assert set(saved) == set(index["weight_map"]) == set(state)
    assert all(torch.equal(saved[name], state[name]) for name in state)
    assert {"lm_head.additional_fc.weight", "model.embed_tokens.additional_embedding.weight"} <= set(saved)

    input_ids, attention_mask, pixel_values = batch
    reloaded = IdeficsForVisionText2Text.from_pretrained(nested).eval()
    expected = reference_logits(model, input_ids, pixel_values, attention_mask)
    assert torch.equal(reference_logits(reloaded, input_ids, pixel_values, attention_mask), expected)

    flat = json.loads(
        (save_hub_layout(model, tokenizer, tmp_path / "flat", layout="flat") / "config.json").read_text()
    )
    config_json = json.loads((nested / "config.json").read_text())
    assert "vision_config" not in flat and "perceiver_config" not in flat
    assert all(flat[key] == config_json["vision_config"][nested] for key, nested in FLAT_VISION_KEYS.items())
    assert all(flat[key] == config_json["perceiver_config"][key] for key in FLAT_PERCEIVER_KEYS)
    assert flat["use_resampler"] is True and flat["vision_model_name"]
    common = set(config_json) - {"vision_config", "perceiver_config"}
    assert {key: flat[key] for key in common} == {key: config_json[key] for key in common}


def test_pickle_layout_and_the_other_hub_files(tokenizer, model, tmp_path):
    directory = save_hub_layout(model, tokenizer, tmp_path / "pickle", pickle=True)
    assert (
        not list(directory.glob("*.safetensors"))
        and not (directory / "model.safetensors.index.json").exists()
    )
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert IdeficsImageProcessor.from_pretrained(directory).image_size == 28
    reloaded = type(tokenizer).from_pretrained(directory)
    assert reloaded.convert_tokens_to_ids(["<fake_token_around_image>", "<image>"]) == [300, 301]
    assert reloaded.pad_token == "<unk>" and len(reloaded) == model.config.vocab_size + 2


def test_greedy_generation_is_the_same_with_and_without_cache(model, batch):
    input_ids, attention_mask, pixel_values = batch
    cached = reference_generate(model, input_ids, pixel_values, attention_mask, 6)
    assert cached.shape == (2, 6)
    assert torch.equal(
        cached, reference_generate(model, input_ids, pixel_values, attention_mask, 6, use_cache=False)
    )
    first = reference_logits(model, input_ids, pixel_values, attention_mask)[:, -1].argmax(-1)
    assert torch.equal(cached[:, 0], first)
    # left padding changes nothing: the second prompt alone generates the same tokens
    length = int(attention_mask[1].sum())
    alone = reference_generate(model, input_ids[1:, -length:], pixel_values[1:], None, 6)
    assert torch.equal(alone, cached[1:])


def test_gates_are_non_zero_and_the_images_change_the_logits(model, batch):
    gates = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1].startswith("alpha_")]
    assert len(gates) == 4 and all(
        (gate != 0).all() and torch.tanh(gate).abs().mean() > 0.1 for gate in gates
    )
    input_ids, attention_mask, pixel_values = batch
    logits = reference_logits(model, input_ids, pixel_values, attention_mask)
    blank = reference_logits(model, input_ids, torch.zeros_like(pixel_values), attention_mask)
    first_image = int((input_ids[0] == 301).nonzero()[0])
    # tokens before the first image see no image, directly or through earlier tokens; all later ones do
    assert torch.equal(logits[0, :first_image], blank[0, :first_image])
    assert (logits[0, first_image:] - blank[0, first_image:]).abs().amax(-1).min() > 1e-4


def test_image_attention_mask_follows_the_most_recent_image_until_eos(tokenizer):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    fake, image = 300, 301
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    #             pad  bos a  fake image fake b  eos b  fake image fake image fake a
    row = [pad, bos, a, fake, image, fake, b, eos, b, fake, image, fake, image, fake, a]
    expected = [
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
    ]
    mask = image_attention_mask(torch.tensor([row]), tokenizer, 3)
    assert mask.dtype == torch.long and torch.equal(mask[0].T, torch.tensor(expected))
    # with room for two images only, the third is dropped, as IdeficsProcessor does
    assert torch.equal(
        image_attention_mask(torch.tensor([row]), tokenizer, 2)[0].T, torch.tensor(expected[:2])
    )

    input_ids, attention_mask = make_prompt(tokenizer, [["a", IMAGE, "b</s>b", IMAGE, IMAGE, "a"], ["a"]])
    assert input_ids[0].tolist() == row[1:]
    assert input_ids[1].tolist() == [pad] * 12 + [bos, a] and attention_mask[1].tolist() == [0] * 12 + [1, 1]
