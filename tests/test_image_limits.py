"""Untrusted images cost a bounded amount to decode and preprocess: only plain raster formats are parsed, thin and
huge images are refused from their header, and the loader skips and counts them without stopping the run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers.data import pair, write_shards
from helpers.model import tiny_model
from PIL import EpsImagePlugin, Image

from openflamingo.data import (
    BadSample,
    DatasetConfig,
    FeatureCache,
    ImageItem,
    ImageLimits,
    ImageTextPair,
    ShardLoader,
    build_feature_cache,
    decode_image,
)
from openflamingo.model.vision import clip_preprocess, to_unit_tensor

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """Smooth content with texture, where resampling differences would show."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, (x * 37 + y * 23) % 256], axis=2).astype(np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_common_formats_decode_to_rgb(fmt):
    image = decode_image(encoded(gradient(40, 30), fmt), f"x.{fmt.lower()}")
    assert image.mode == "RGB" and image.size == (40, 30)


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "PDF", "EPS"])
def test_other_formats_are_refused_as_undecodable(fmt):
    with pytest.raises(BadSample, match="undecodable_image.*not an image in an accepted format"):
        decode_image(encoded(gradient(40, 30), fmt), "x.img")


def test_an_eps_file_never_reaches_the_ghostscript_plugin(monkeypatch):
    data = encoded(gradient(40, 30), "EPS")
    Image.init()  # every plugin registered: the worst case for what Image.open would try
    calls = []
    parse_header = EpsImagePlugin.EpsImageFile._open

    def recorded(self):
        calls.append("_open")
        parse_header(self)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", recorded)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append("gs"))
    with pytest.raises(BadSample, match="undecodable_image"):
        decode_image(data, "x.jpg")
    assert calls == []
    Image.open(io.BytesIO(data))  # the check above can fail: a plain open does hand the file to the plugin
    assert calls == ["_open"]


def test_a_thin_image_is_refused_from_its_header():
    thin = encoded(Image.new("RGB", (4000, 1)), "PNG")
    with pytest.raises(BadSample, match="extreme_aspect_ratio: x.png: image is 4000x1"):
        decode_image(thin[:-30], "x.png")  # cut short: refused before any pixel is decoded
    assert decode_image(thin, "x.png", ImageLimits(max_aspect_ratio=4000)).size == (4000, 1)
    assert decode_image(encoded(Image.new("RGB", (20, 400)), "PNG"), "x.png").size == (20, 400)
    with pytest.raises(BadSample, match="extreme_aspect_ratio"):
        decode_image(encoded(Image.new("RGB", (20, 401)), "PNG"), "x.png")


def test_an_animated_gif_is_read_as_its_first_frame_only():
    frames = [Image.new("RGB", (64, 64), (255, 0, 0))] + [
        Image.new("RGB", (64, 64), (0, 0, i % 256)) for i in range(999)
    ]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=10)
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 1000
    start = time.perf_counter()
    image = decode_image(buffer.getvalue(), "x.gif")
    assert time.perf_counter() - start < 0.5  # 0.2 ms here; all 1000 frames would take tens of ms at least
    assert image.getpixel((10, 10)) == (255, 0, 0)


def old_clip_resize(image: Image.Image, size: int) -> Image.Image:
    """clip_preprocess before the thin-image path: torchvision's Resize(size) + CenterCrop(size) on PIL."""
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (333, 333), (1000, 40), (31, 992), (7, 5)])
def test_clip_preprocess_of_images_up_to_32_to_1_is_unchanged(size):
    image = gradient(*size)
    expected = to_unit_tensor(old_clip_resize(image, 32))
    assert torch.equal(clip_preprocess(image, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), expected)


PEAK_MEMORY = """
import resource, sys
from PIL import Image
from openflamingo.model.vision import clip_preprocess, to_unit_tensor
results = []
for width in (4000, 1_000_000):
    image = Image.new("RGB", (width, 1), (200, 100, 50))
    image.load()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels = clip_preprocess(image, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    results.append([width, list(pixels.shape), grown_mb, pixels.mean().item()])
print(results)
"""


def test_clip_preprocess_of_a_thin_image_has_bounded_peak_memory():
    # ru_maxrss is the process's peak, so it is measured in a fresh one. Resizing the short side first would take
    # 800 MB for 4000x1 and 200 GB for 1,000,000x1; the address space is capped so such a regression fails fast
    # with a MemoryError instead of exhausting the machine.
    cap = "import resource; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
    run = subprocess.run(
        [sys.executable, "-c", cap + PEAK_MEMORY], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for width, shape, grown_mb, mean in json.loads(run.stdout):
        assert shape == [3, 224, 224], width
        assert grown_mb < 50, f"{width}x1 grew the peak by {grown_mb:.0f} MB"
        assert mean == pytest.approx((200 + 100 + 50) / 3 / 255, abs=1e-3)  # the image's colour, resampled


def thin_pair() -> ImageTextPair:
    return ImageTextPair("thin", ImageItem(encoded(Image.new("RGB", (4000, 1)), "PNG"), "png"), "a thin line")


def test_a_thin_image_in_a_shard_is_skipped_and_counted_and_the_run_goes_on(tmp_path, tokenizer_dir):
    model = tiny_model(tokenizer_dir)
    samples = [pair(0), pair(1), thin_pair(), pair(2), pair(3)]
    shards = write_shards(tmp_path / "shards", samples, 10)
    config = DatasetConfig(
        shards, batch_size=2, epochs=1, num_workers=0, shuffle_buffer=1, max_bad_fraction=None
    )
    cache = FeatureCache(
        build_feature_cache(shards, model, tmp_path / "features.safetensors", progress=False)
    )
    for features in (None, cache):
        loader = ShardLoader(
            config, model.tokenizer, model.vision_encoder.preprocess_image, features=features
        )
        batches = list(loader)
        assert sum(batch["input_ids"].shape[0] for batch in batches) == 4
        assert loader.stats()["bad"] == {"extreme_aspect_ratio": 1}
