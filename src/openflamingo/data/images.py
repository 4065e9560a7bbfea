"""Decoding image bytes from shards, with limits: a web shard holds 0-byte files, non-images and decompression bombs."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from .samples import EMPTY_IMAGE, IMAGE_TOO_LARGE, UNDECODABLE_IMAGE, BadSample


@dataclass
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 8192 * 8192
    # JPEGs can be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, several times faster. With draft_size=224
    # the decoder picks the smallest such scale that keeps both sides >= 224, so the preprocess's own resize still
    # does the final resampling. None decodes at full size (bit-exact with a plain PIL pipeline, e.g. for eval).
    draft_size: int | None = None


def decode_image(data: bytes, name: str, limits: ImageLimits | None = None) -> Image.Image:
    """RGB PIL image from bytes; raises BadSample(empty_image | image_too_large | undecodable_image)."""
    limits = limits or ImageLimits()
    if not data:
        raise BadSample(EMPTY_IMAGE, f"image {name} is 0 bytes")
    if len(data) > limits.max_bytes:
        raise BadSample(IMAGE_TOO_LARGE, f"image {name} is {len(data)} bytes > max_bytes={limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on palette transparency, EXIF quirks, large images
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > limits.max_pixels:
                raise BadSample(
                    IMAGE_TOO_LARGE, f"image {name} is {width}x{height} > max_pixels={limits.max_pixels}"
                )
            if limits.draft_size and image.format == "JPEG":
                image.draft("RGB", (limits.draft_size, limits.draft_size))
            return image.convert("RGB")
    except BadSample:
        raise
    except Image.DecompressionBombError as error:
        raise BadSample(IMAGE_TOO_LARGE, f"image {name}: {error}") from None
    except Exception as error:  # PIL's decoders raise many types on corrupt input; none may stop a run
        raise BadSample(UNDECODABLE_IMAGE, f"image {name}: {type(error).__name__}: {error}") from None
