"""Llama 3.2 Vision (Mllama) image preprocessing: tiles, aspect-ratio ids and masks, equal to transformers' output.

Pixel-exact with transformers' `MllamaImageProcessor` (4.x) and its PIL backend `MllamaImageProcessorPil` (5.x, the
one `MllamaImageProcessor` falls back to without torchvision), written with PIL + numpy + torch. Per image:

1. RGB: images with an alpha band or a transparency key are composited onto white, others `convert("RGB")`.
2. Canvas: among the tile grids `rows x cols` with `rows * cols <= max_image_tiles` (see `supported_aspect_ratios`),
   take the canvas `(rows * tile, cols * tile)` that needs the smallest upscale `s = min(canvas_h / h, canvas_w / w)
   >= 1`; when every canvas needs a downscale, the largest `s < 1`; ties go to the smallest area, then the first in
   the list.
3. Resize: each side is first clipped into `[tile, canvas side]`; the side with the smaller scale takes its clipped
   value, the other `floor(side * that scale)`, at least 1 and at most its own clipped value. So an image smaller
   than one tile is upscaled until one side reaches the tile size, and a thin image may stay thinner than a tile on
   its short side. PIL resizes the uint8 image (BILINEAR by default, no `reducing_gap`).
4. Pad: zeros (black, uint8) right and bottom up to the canvas, *before* normalisation, so the padded area holds
   `-mean / std`, not 0.
5. Rescale and normalise: `float32(float64(x) * rescale_factor)`, then `(x - mean) / std` in float32. Every output
   value is a function of (channel, uint8 value) alone, so it is looked up in a (3, 256) table computed that way.
6. Tiles: the canvas is cut row by row into `rows * cols` tiles of `(3, tile, tile)`.

A batch (samples, each a list of images) gives:
- `pixel_values` float32 `(B, max_images, max_image_tiles, 3, tile, tile)`: tiles beyond an image's count and images
  beyond a sample's count are exactly 0.0 (unlike the canvas padding above);
- `aspect_ratio_ids` int64 `(B, max_images)`: 1 + the index of `(rows, cols)` in `supported_aspect_ratios`, 0 for a
  missing image;
- `aspect_ratio_mask` int64 `(B, max_images, max_image_tiles)`: 1 for an image's tiles; the first tile is 1 for
  missing images too (transformers pads aspect ratios with (1, 1));
- `num_tiles` `list[list[int]]`: each sample's tile counts, not padded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import InputError
from .vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# Llama-3.2-11B-Vision(-Instruct)'s preprocessor_config.json. transformers' own constructor defaults differ (224 px
# tiles, mean = std = 0.5); the checkpoints override them with these.
MLLAMA_TILE_SIZE = 560
MLLAMA_MAX_IMAGE_TILES = 4
MLLAMA_RESCALE_FACTOR = 1 / 255  # 0.00392156862745098 in the JSON
MLLAMA_RESAMPLE = Image.Resampling.BILINEAR  # "resample": 2


@dataclass(frozen=True)
class MllamaImageConfig:
    tile_size: int = MLLAMA_TILE_SIZE  # square tiles, also the vision tower's image_size
    max_image_tiles: int = MLLAMA_MAX_IMAGE_TILES
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: Image.Resampling = MLLAMA_RESAMPLE
    rescale_factor: float = MLLAMA_RESCALE_FACTOR

    def __post_init__(self) -> None:
        for name in ("tile_size", "max_image_tiles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"mllama images: {name}={value!r} must be an integer >= 1")
        mean, std = tuple(self.image_mean), tuple(self.image_std)
        if len(mean) != 3 or len(std) != 3:
            raise InputError(
                f"mllama images: image_mean={list(mean)} and image_std={list(std)} need 3 values each (R, G, B)"
            )
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise InputError(f"mllama images: image_std={list(std)} must be finite and > 0")
        try:
            resample = Image.Resampling(self.resample)
        except ValueError:
            names = ", ".join(f"{r.name}={r.value}" for r in Image.Resampling)
            raise InputError(
                f"mllama images: resample={self.resample!r} is not a PIL filter ({names})"
            ) from None
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise InputError(f"mllama images: rescale_factor={self.rescale_factor!r} must be finite and > 0")
        object.__setattr__(self, "image_mean", mean)
        object.__setattr__(self, "image_std", std)
        object.__setattr__(self, "resample", resample)


@dataclass
class MllamaImages:
    pixel_values: Tensor  # float32 (B, max_images, max_image_tiles, 3, tile, tile)
    aspect_ratio_ids: Tensor  # int64 (B, max_images)
    aspect_ratio_mask: Tensor  # int64 (B, max_images, max_image_tiles)
    num_tiles: list[list[int]]  # per sample, per image


# ---------------------------------------------------------------------------------------------------------------
# Canvas geometry
# ---------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every tile grid (rows, cols) with rows * cols <= max_image_tiles, rows major: the order of the aspect-ratio
    ids the vision tower's embeddings were trained with (id = index + 1). 4 tiles: (1,1) (1,2) (1,3) (1,4) (2,1)
    (2,2) (3,1) (4,1)."""
    if max_image_tiles < 1:
        raise InputError(f"mllama images: max_image_tiles={max_image_tiles!r} must be an integer >= 1")
    return tuple(
        (rows, cols)
        for rows in range(1, max_image_tiles + 1)
        for cols in range(1, max_image_tiles + 1)
        if rows * cols <= max_image_tiles
    )


@lru_cache(maxsize=1024)
def optimal_canvas(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """The (height, width) of the tile grid an image of this size is resized into (step 2 of the module docstring).

    The scales are float64 quotients compared exactly, as transformers does with numpy: equal-looking ratios that
    round differently are not ties."""
    canvases = [
        (rows * tile_size, cols * tile_size) for rows, cols in supported_aspect_ratios(max_image_tiles)
    ]
    scales = [min(canvas_h / height, canvas_w / width) for canvas_h, canvas_w in canvases]
    upscales = [s for s in scales if s >= 1]
    selected = min(upscales) if upscales else max(scales)
    chosen = [canvas for canvas, s in zip(canvases, scales, strict=True) if s == selected]
    return min(chosen, key=lambda canvas: canvas[0] * canvas[1])  # min keeps the first of equal areas


def fit_to_canvas(
    height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int
) -> tuple[int, int]:
    """The (height, width) an image is resized to inside its canvas (step 3 of the module docstring)."""
    target_height = min(max(height, tile_size), canvas_height)
    target_width = min(max(width, tile_size), canvas_width)
    scale_h, scale_w = target_height / height, target_width / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_h) or 1, target_width)


# ---------------------------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """transformers 5's RGB conversion: alpha (an "A" band, or a palette/RGB transparency key) is composited onto
    white, anything else is `convert("RGB")`. transformers 4 composites every non-RGB image (the same pixels for
    modes without alpha) but passes an RGB image with a transparency key through untouched."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@lru_cache(maxsize=16)
def _normalization_table(
    mean: tuple[float, ...], std: tuple[float, ...], rescale_factor: float
) -> np.ndarray:
    """(3, 256) float32: the normalised value of each uint8 level per channel, with transformers' rounding (the
    rescale in float64, then float32 throughout: `x / 255` in float32 would differ in the last bit)."""
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (levels[None, :] - mean32) / std32
    table.flags.writeable = False
    return table


def tile_image(image: Image.Image, config: MllamaImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """One PIL image -> (float32 tiles (rows * cols, 3, tile, tile), (rows, cols))."""
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"mllama images: an image of size {width}x{height} (width x height) has no pixels")
    tile = config.tile_size
    canvas_height, canvas_width = optimal_canvas(height, width, config.max_image_tiles, tile)
    new_height, new_width = fit_to_canvas(height, width, canvas_height, canvas_width, tile)
    # transformers resizes even when the size is unchanged; PIL then returns a copy, so skipping it changes nothing.
    resized = to_rgb(image).resize((new_width, new_height), config.resample, reducing_gap=None)
    canvas = np.zeros((canvas_height, canvas_width, 3), dtype=np.uint8)
    canvas[:new_height, :new_width] = np.asarray(resized)
    table = _normalization_table(config.image_mean, config.image_std, config.rescale_factor)
    pixels = np.stack([table[c][canvas[:, :, c]] for c in range(3)])  # (3, canvas_h, canvas_w)
    rows, cols = canvas_height // tile, canvas_width // tile
    tiles = (
        pixels.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    )
    return tiles, (rows, cols)


# ---------------------------------------------------------------------------------------------------------------
# A batch
# ---------------------------------------------------------------------------------------------------------------
def _check_batch(batch: Sequence[Sequence[Image.Image]]) -> None:
    if isinstance(batch, Image.Image) or not isinstance(batch, Sequence) or isinstance(batch, str):
        raise InputError(
            f"mllama images: expected a batch as a list of samples, each a list of PIL images, got "
            f"{type(batch).__name__}; wrap one image as [[image]]"
        )
    if len(batch) == 0:
        raise InputError("mllama images: the batch is empty; give at least one sample (a list of PIL images)")
    for i, sample in enumerate(batch):
        if isinstance(sample, Image.Image) or not isinstance(sample, Sequence) or isinstance(sample, str):
            raise InputError(
                f"mllama images: sample {i} is a {type(sample).__name__}, not a list of PIL images; nest the "
                "batch as [[image, ...], ...] (transformers reads a flat list as one sample with several images)"
            )
        for j, image in enumerate(sample):
            if not isinstance(image, Image.Image):
                raise InputError(
                    f"mllama images: sample {i} image {j} is a {type(image).__name__}, expected a PIL image"
                )


def preprocess_mllama_images(
    batch: Sequence[Sequence[Image.Image]], config: MllamaImageConfig | None = None
) -> MllamaImages:
    """Samples of PIL images -> Mllama's vision inputs (see the module docstring for shapes and padding).

    A sample may have no images (a text-only sample beside others with images): its rows are padding. transformers
    gives the same, but fails when no sample has an image; here that gives `max_images = 0`."""
    config = config or MllamaImageConfig()
    _check_batch(batch)
    ratios = supported_aspect_ratios(config.max_image_tiles)
    tile, max_tiles = config.tile_size, config.max_image_tiles
    max_images = max(len(sample) for sample in batch)
    pixel_values = torch.zeros(len(batch), max_images, max_tiles, 3, tile, tile, dtype=torch.float32)
    aspect_ratio_ids = torch.zeros(len(batch), max_images, dtype=torch.int64)
    aspect_ratio_mask = torch.zeros(len(batch), max_images, max_tiles, dtype=torch.int64)
    aspect_ratio_mask[:, :, 0] = 1
    num_tiles: list[list[int]] = []
    for i, sample in enumerate(batch):
        counts = []
        for j, image in enumerate(sample):
            tiles, grid = tile_image(image, config)
            pixel_values[i, j, : len(tiles)] = torch.from_numpy(tiles)
            aspect_ratio_ids[i, j] = ratios.index(grid) + 1
            aspect_ratio_mask[i, j, : len(tiles)] = 1
            counts.append(len(tiles))
        num_tiles.append(counts)
    return MllamaImages(pixel_values, aspect_ratio_ids, aspect_ratio_mask, num_tiles)
