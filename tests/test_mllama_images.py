"""Mllama (Llama 3.2 Vision) image preprocessing equals transformers' MllamaImageProcessor bit for bit.

The reference is the PIL/numpy processor: `MllamaImageProcessor` in transformers 4.x, `MllamaImageProcessorPil` in
5.x (what 5.x's `MllamaImageProcessor` falls back to without torchvision, which this project does not install).
5.x's torchvision backend is compared too where torchvision is importable; it resizes and normalises differently,
so that comparison has a stated bound instead of equality (see test_torchvision_backend_stays_within_two_levels).
Processors are built from their constructors: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from openflamingo.errors import InputError
from openflamingo.model.mllama_images import (
    MllamaImageConfig,
    fit_to_canvas,
    optimal_canvas,
    preprocess_mllama_images,
    supported_aspect_ratios,
    to_rgb,
)

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
if TRANSFORMERS_5:
    from transformers.models.mllama import image_processing_pil_mllama as hf_mllama
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil as Reference
else:
    from transformers.models.mllama import image_processing_mllama as hf_mllama
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor as Reference

# Llama-3.2-11B-Vision(-Instruct)'s preprocessor_config.json, less its two class-name keys.
LLAMA_32_VISION_PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_image_tiles": 4,
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 560, "width": 560},
}


def make_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Noise over a gradient: noise catches any change of resampling filter, the gradient is photo-like."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + 2 * y) % 256], -1)
    noise = rng.integers(-40, 41, (height, width, 3))
    rgb = Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        alpha[0, 0], alpha[-1, -1] = 0, 255
        return Image.merge("RGBA", (*rgb.split(), Image.fromarray(alpha)))
    if mode == "P":
        return rgb.quantize(colors=32)
    if mode == "P-transparent":
        palette = rgb.quantize(colors=32)
        palette.info["transparency"] = 3
        return palette
    return rgb.convert(mode)


# (width, height, mode): square, tall, wide, tiny (upscaled), large (downscaled), thin, exact tile multiples, 1x1.
IMAGES = [
    (640, 480, "RGB"),
    (560, 560, "RGB"),
    (1000, 1000, "L"),
    (300, 900, "RGB"),
    (1500, 700, "RGBA"),
    (20, 300, "RGB"),
    (300, 20, "P"),
    (1120, 560, "RGB"),
    (333, 777, "P-transparent"),
    (2000, 300, "LA"),
    (7, 3, "RGB"),
    (1, 1, "L"),
]


def image_batch() -> list[list[Image.Image]]:
    """The images above as samples of 3, 1, 0, 2, 4 and 2 images."""
    images = [make_image(w, h, seed, mode) for seed, (w, h, mode) in enumerate(IMAGES)]
    sizes, batch, start = (3, 1, 0, 2, 4, 2), [], 0
    for size in sizes:
        batch.append(images[start : start + size])
        start += size
    return batch


def reference(batch, config: MllamaImageConfig, processor_class=Reference):
    processor = processor_class(
        size={"height": config.tile_size, "width": config.tile_size},
        max_image_tiles=config.max_image_tiles,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        resample=int(config.resample),
    )
    return processor(batch, return_tensors="pt")


def assert_same(ours, theirs) -> None:
    assert ours.pixel_values.dtype == theirs["pixel_values"].dtype == torch.float32
    assert ours.aspect_ratio_ids.dtype == theirs["aspect_ratio_ids"].dtype == torch.int64
    assert ours.aspect_ratio_mask.dtype == theirs["aspect_ratio_mask"].dtype == torch.int64
    assert ours.pixel_values.shape == theirs["pixel_values"].shape
    assert torch.equal(ours.pixel_values, theirs["pixel_values"])
    assert torch.equal(ours.aspect_ratio_ids, theirs["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, theirs["aspect_ratio_mask"])
    assert ours.num_tiles == theirs["num_tiles"]


def test_defaults_are_llama_32_vision_preprocessor_config():
    config = MllamaImageConfig()
    hf = LLAMA_32_VISION_PREPROCESSOR_CONFIG
    assert (config.tile_size, config.tile_size) == (hf["size"]["height"], hf["size"]["width"])
    assert config.max_image_tiles == hf["max_image_tiles"]
    assert list(config.image_mean) == hf["image_mean"] and list(config.image_std) == hf["image_std"]
    assert int(config.resample) == hf["resample"] and config.rescale_factor == hf["rescale_factor"]


def test_llama_32_vision_settings_match_transformers_exactly():
    batch = image_batch()
    theirs = Reference(**LLAMA_32_VISION_PREPROCESSOR_CONFIG)(batch, return_tensors="pt")
    assert_same(preprocess_mllama_images(batch), theirs)


@pytest.mark.parametrize("max_image_tiles, tile_size", [(1, 560), (2, 560), (6, 224)])
def test_other_tile_limits_and_sizes_match_transformers_exactly(max_image_tiles, tile_size):
    config = MllamaImageConfig(tile_size=tile_size, max_image_tiles=max_image_tiles)
    batch = image_batch()
    assert_same(preprocess_mllama_images(batch, config), reference(batch, config))


def test_transformers_constructor_defaults_match_exactly():
    # transformers' own defaults are not Llama's: 224 px tiles, mean = std = 0.5 (IMAGENET_STANDARD_*).
    config = MllamaImageConfig(tile_size=224, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    batch = [[make_image(800, 450, 0), make_image(90, 200, 1, "RGBA")]]
    assert_same(preprocess_mllama_images(batch, config), Reference()(batch, return_tensors="pt"))


def test_bicubic_resample_matches_transformers_exactly():
    config = MllamaImageConfig(tile_size=112, resample=Image.Resampling.BICUBIC)
    batch = [[make_image(w, h, seed) for seed, (w, h, _) in enumerate(IMAGES[:6])]]
    assert_same(preprocess_mllama_images(batch, config), reference(batch, config))


def test_two_samples_with_one_and_two_images():
    wide, tall, square = make_image(1200, 500, 0), make_image(400, 1300, 1), make_image(600, 600, 2)
    batch = [[wide], [tall, square]]
    ours = preprocess_mllama_images(batch)
    assert_same(ours, reference(batch, MllamaImageConfig()))
    assert ours.pixel_values.shape == (2, 2, 4, 3, 560, 560)
    # Any upscale beats a downscale: 1200x500 takes 1 row x 3 cols (id 3, scale 1.12) over 1x2 (scale 0.93).
    # 400x1300: 3 rows x 1 col (id 7); 600x600 is too big for one tile, so 2x2 (id 6).
    assert ours.aspect_ratio_ids.tolist() == [[3, 0], [7, 6]]
    assert ours.num_tiles == [[3], [3, 4]]
    assert ours.aspect_ratio_mask.tolist() == [[[1, 1, 1, 0], [1, 0, 0, 0]], [[1, 1, 1, 0], [1, 1, 1, 1]]]
    assert not ours.pixel_values[0, 1].any() and not ours.pixel_values[0, 0, 3:].any()


def test_canvas_padding_is_normalised_black_and_missing_tiles_are_zero():
    config = MllamaImageConfig(tile_size=56)
    ours = preprocess_mllama_images([[make_image(100, 30, 0)]], config)  # 2 tiles wide, resized to 112x33
    black = [(0 - m) / s for m, s in zip(config.image_mean, config.image_std, strict=True)]
    pad = ours.pixel_values[0, 0, :2, :, 33:, :]
    for c in range(3):
        torch.testing.assert_close(pad[:, c], torch.full_like(pad[:, c], black[c]))
    assert not ours.pixel_values[0, 0, 2:].any()


def test_supported_aspect_ratios_and_canvas_geometry_match_transformers():
    assert supported_aspect_ratios(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    sides = sorted({1, 2, 3, 7, 20, 55, 56, 57, 111, 112, 113, 223, 224, 300, 559, 560, 561, 700, 1119, 1120, 1121,
                    1500, 1680, 2239, 2240, 2241, 5000})  # fmt: skip
    hf_ratios, hf_canvas = hf_mllama.get_all_supported_aspect_ratios, hf_mllama.get_optimal_tiled_canvas
    hf_fit = hf_mllama.get_image_size_fit_to_canvas
    for max_tiles in (1, 2, 3, 4, 6, 8):
        assert list(supported_aspect_ratios(max_tiles)) == hf_ratios(max_tiles)
        for tile in (56, 224, 560):
            for height in sides:
                for width in sides:
                    canvas = optimal_canvas(height, width, max_tiles, tile)
                    assert canvas == tuple(int(v) for v in hf_canvas(height, width, max_tiles, tile))
                    fitted = fit_to_canvas(height, width, *canvas, tile)
                    assert fitted == tuple(int(v) for v in hf_fit(height, width, *canvas, tile))


def test_rgb_conversion_composites_alpha_onto_white():
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (4, 4), 77)
    assert to_rgb(grey).getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.skipif(
    not TRANSFORMERS_5, reason="transformers 4 passes an RGB image's transparency key through"
)
def test_rgb_image_with_transparency_key_matches_transformers_5():
    image = make_image(300, 200, 0)
    image.info["transparency"] = image.getpixel((0, 0))
    config = MllamaImageConfig(tile_size=112)
    assert_same(preprocess_mllama_images([[image]], config), reference([[image]], config))


@pytest.mark.skipif(
    not TRANSFORMERS_5 or importlib.util.find_spec("torchvision") is None,
    reason="transformers 5's torchvision backend needs torchvision, which openflamingo does not install",
)
def test_torchvision_backend_stays_within_two_levels():
    # Measured with transformers 5.25.0 + torchvision 0.29.1 (torch 2.14.1): ids, masks and tile counts are equal;
    # pixels differ by up to 2.4e-7 from the fused (x - 255 mean) / (255 std) normalisation everywhere, and by 1-2
    # uint8 levels (max 0.030 = 2 / 255 / std_B after normalisation) on a few percent of pixels where torchvision's
    # antialiased bilinear resize rounds differently from PIL's (on noisy images, up- and downscaled alike).
    from transformers.models.mllama.image_processing_mllama import (
        MllamaImageProcessor as TorchvisionReference,
    )

    config = MllamaImageConfig()
    batch = image_batch()
    ours = preprocess_mllama_images(batch, config)
    theirs = reference(batch, config, TorchvisionReference)
    assert torch.equal(ours.aspect_ratio_ids, theirs["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, theirs["aspect_ratio_mask"])
    assert ours.num_tiles == theirs["num_tiles"]
    two_levels = 2 / 255 / min(config.image_std) + 1e-6
    assert (ours.pixel_values - theirs["pixel_values"]).abs().max().item() <= two_levels


def test_bad_inputs_name_the_value():
    image = make_image(10, 10, 0)
    with pytest.raises(InputError, match=r"0x5"):
        preprocess_mllama_images([[Image.new("RGB", (0, 5))]])
    with pytest.raises(InputError, match=r"sample 0 image 1 is a ndarray"):
        preprocess_mllama_images([[image, np.zeros((4, 4, 3), np.uint8)]])
    with pytest.raises(InputError, match=r"sample 0 is a Image"):
        preprocess_mllama_images([image])
    with pytest.raises(InputError, match=r"\[\[image\]\]"):
        preprocess_mllama_images(image)
    with pytest.raises(InputError, match="empty"):
        preprocess_mllama_images([])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_image_tiles": 0}, "max_image_tiles=0"),
        ({"max_image_tiles": 2.0}, "max_image_tiles=2.0"),
        ({"tile_size": -1}, "tile_size=-1"),
        ({"image_mean": (0.5, 0.5)}, r"image_mean=\[0.5, 0.5\]"),
        ({"image_std": (0.5, 0.0, 0.5)}, r"image_std=\[0.5, 0.0, 0.5\]"),
        ({"resample": 99}, "resample=99"),
        ({"rescale_factor": 0.0}, "rescale_factor=0.0"),
    ],
)
def test_bad_settings_name_the_value(settings, message):
    with pytest.raises(InputError, match=message):
        MllamaImageConfig(**settings)


def test_a_batch_without_images_has_no_image_rows():
    ours = preprocess_mllama_images([[], []], MllamaImageConfig(tile_size=14))
    assert ours.pixel_values.shape == (2, 0, 4, 3, 14, 14) and ours.num_tiles == [[], []]
