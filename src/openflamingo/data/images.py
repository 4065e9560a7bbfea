"""Decoding untrusted image bytes with bounded cost, for the shard loader and the server alike: a web shard or a
request can hold 0-byte files, non-images, decompression bombs and images a thousand times wider than tall.

Every limit is checked from the header, before a pixel is decoded, and only a few plain raster formats are parsed:
PIL's other plugins (EPS hands the file to Ghostscript, PDF, ICO, TIFF, ...) never see the bytes."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import PIL.WebPImagePlugin  # noqa: F401 (registers WEBP; else the first Image.open imports all ~45 plugins)
from PIL import Image, UnidentifiedImageError

from .samples import EMPTY_IMAGE, EXTREME_ASPECT_RATIO, IMAGE_TOO_LARGE, UNDECODABLE_IMAGE, BadSample

# What cameras, browsers and dataset tools produce. An animated GIF, WebP or PNG is read as its first frame only.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


@dataclass
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 8192 * 8192
    # longer side / shorter side. A centre-crop preprocess sees a sliver of a thinner image, and resizing its short
    # side first costs size^2 * ratio pixels (a 4000x1 PNG: 800 MB at 224 px). 20 keeps panoramas, banners and
    # long screenshots (1280x25600).
    max_aspect_ratio: float = 20.0
    # JPEGs can be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, several times faster. With draft_size=224
    # the decoder picks the smallest such scale that keeps both sides >= 224, so the preprocess's own resize still
    # does the final resampling. None decodes at full size (bit-exact with a plain PIL pipeline, e.g. for eval).
    draft_size: int | None = None


def decode_image(data: bytes, name: str, limits: ImageLimits | None = None) -> Image.Image:
    """RGB PIL image from bytes; raises BadSample(empty_image | image_too_large | extreme_aspect_ratio |
    undecodable_image) with a message that starts with `name`."""
    limits = limits or ImageLimits()
    if not data:
        raise BadSample(EMPTY_IMAGE, f"{name}: image is 0 bytes")
    if len(data) > limits.max_bytes:
        raise BadSample(
            IMAGE_TOO_LARGE, f"{name}: image is {len(data)} bytes, over the limit of {limits.max_bytes}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on palette transparency, EXIF quirks, large images
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > limits.max_pixels:
                raise BadSample(
                    IMAGE_TOO_LARGE,
                    f"{name}: image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{limits.max_pixels}",
                )
            if max(width, height) > limits.max_aspect_ratio * min(width, height):
                raise BadSample(
                    EXTREME_ASPECT_RATIO,
                    f"{name}: image is {width}x{height}, longer side over {limits.max_aspect_ratio:g} times the "
                    "shorter; pad or crop it",
                )
            if limits.draft_size:
                image.draft("RGB", (limits.draft_size, limits.draft_size))  # a no-op for all but JPEG
            image.load()
            # convert() copies even to the same mode: returning an RGB image as is halves the peak memory.
            return image if image.mode == "RGB" else image.convert("RGB")
    except BadSample:
        raise
    except Image.DecompressionBombError as error:
        raise BadSample(IMAGE_TOO_LARGE, f"{name}: {error}") from None
    except UnidentifiedImageError:
        raise BadSample(
            UNDECODABLE_IMAGE, f"{name}: not an image in an accepted format ({', '.join(FORMATS)})"
        ) from None
    except Exception as error:  # PIL's decoders raise many types on corrupt input; none may stop a run
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadSample(UNDECODABLE_IMAGE, f"{name}: not a readable image ({detail})") from None
