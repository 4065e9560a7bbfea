"""Images of a request, read only from where the server allows: `data:` URLs always; `http(s)://` with
`--allow-image-urls`; `file://` inside `--allow-local-images DIR`. Size and pixel limits apply before decoding, so
a small file that expands to a huge bitmap (a decompression bomb) is refused without being decoded."""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import ApiError

DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 20 * 1024 * 1024  # OpenAI's own limit per image
    max_pixels: int = 40_000_000  # e.g. 8000 x 5000; PIL's bomb warning starts at ~89M
    allow_urls: bool = False
    local_dir: Path | None = None
    url_timeout_s: float = 10.0


def read_image(url: str, where: str, policy: ImagePolicy) -> Image.Image:
    """The RGB image behind `url`; ApiError (400, param=`where`) for anything not allowed or not a whole image."""
    if url.startswith("data:"):
        data = _data_url_bytes(url, where, policy)
    elif url.startswith(("http://", "https://")):
        data = _fetch(url, where, policy)
    elif url.startswith("file://"):
        data = _local_file(url, where, policy)
    else:
        scheme = url.split(":", 1)[0][:20] if ":" in url else "(none)"
        raise ApiError(
            f"{where}: image URL scheme {scheme!r} is not supported; send a data:image/...;base64 URL", where
        )
    return decode_image(data, where, policy)


def decode_image(data: bytes, where: str, policy: ImagePolicy) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We apply our own (lower) pixel limit below; PIL still raises DecompressionBombError far above it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > policy.max_pixels:
            raise ApiError(
                f"{where}: image is {width}x{height} = {width * height} pixels, over this server's limit of "
                f"{policy.max_pixels}",
                where,
                code="image_too_large",
            )
        image.load()  # decodes now: a truncated or corrupt file fails here, not later inside the model thread
        return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise ApiError(
            f"{where}: image refused as a decompression bomb ({error})", where, code="image_too_large"
        ) from None
    except (OSError, ValueError, SyntaxError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ApiError(f"{where}: not a readable image ({message})", where, code="invalid_image") from None


def _data_url_bytes(url: str, where: str, policy: ImagePolicy) -> bytes:
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise ApiError(f"{where}: malformed data URL; expected data:image/...;base64,...", where)
    media_type, params = match.group("type"), match.group("params").split(";")
    if media_type and not media_type.startswith("image/"):
        raise ApiError(
            f"{where}: data URL media type {media_type!r} is not an image", where, code="invalid_image"
        )
    if "base64" not in params:
        raise ApiError(f"{where}: data URL must be base64-encoded (data:image/...;base64,...)", where)
    payload = match.group("data")
    if (
        len(payload) * 3 // 4 > policy.max_bytes + 3
    ):  # checked before decoding: no huge allocation for a refusal
        raise _too_many_bytes(len(payload) * 3 // 4, where, policy)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{where}: data URL is not valid base64", where, code="invalid_image") from None


def _fetch(url: str, where: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_urls:
        raise ApiError(
            f"{where}: http(s) image URLs are refused; send the image as a data: URL (or start the server with "
            "--allow-image-urls)",
            where,
            code="image_url_not_allowed",
        )
    try:
        with urllib.request.urlopen(url, timeout=policy.url_timeout_s) as response:
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ApiError(f"{where}: cannot fetch image URL ({error})", where, code="invalid_image") from None
    if len(data) > policy.max_bytes:
        raise _too_many_bytes(len(data), where, policy)
    return data


def _local_file(url: str, where: str, policy: ImagePolicy) -> bytes:
    if policy.local_dir is None:
        raise ApiError(
            f"{where}: file:// image URLs are refused; send the image as a data: URL (or start the server with "
            "--allow-local-images DIR)",
            where,
            code="image_url_not_allowed",
        )
    parsed = urllib.parse.urlparse(url)
    root = policy.local_dir.resolve()
    # resolve() follows symbolic links, so a link inside DIR that points outside it is refused too.
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if parsed.netloc not in ("", "localhost") or not path.is_relative_to(root):
        raise ApiError(
            f"{where}: {url} is outside the allowed image directory", where, code="image_url_not_allowed"
        )
    try:
        if path.stat().st_size > policy.max_bytes:
            raise _too_many_bytes(path.stat().st_size, where, policy)
        return path.read_bytes()
    except OSError as error:
        raise ApiError(
            f"{where}: cannot read {url} ({error.strerror})", where, code="invalid_image"
        ) from None


def _too_many_bytes(size: int, where: str, policy: ImagePolicy) -> ApiError:
    return ApiError(
        f"{where}: image is {size} bytes, over this server's limit of {policy.max_bytes} (--max-image-bytes)",
        where,
        code="image_too_large",
    )
