"""Images of a request, read only from where the server allows: `data:` URLs always; `http(s)://` with
`--allow-image-urls`; `file://` inside `--allow-local-images DIR`. Size, pixel and aspect-ratio limits apply before
decoding (data/images.py, shared with the shard loader), so a small file that expands to a huge bitmap (a
decompression bomb) is refused without being decoded.

An image URL is fetched as a server-side request a client chooses, so it may only reach publicly routable
addresses (or networks the operator trusts), every redirect is checked again, and the whole download has one
deadline."""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data import images as data_images
from ..data.samples import EXTREME_ASPECT_RATIO, IMAGE_TOO_LARGE, BadSample
from .errors import ApiError

log = logging.getLogger("openflamingo.serve")

DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3
HEADERS = {"User-Agent": "openflamingo", "Accept": "image/*", "Connection": "close"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# A refused image's error code, and the flags that raise its limit.
REFUSALS = {
    IMAGE_TOO_LARGE: ("image_too_large", "--max-image-bytes, --max-image-pixels"),
    EXTREME_ASPECT_RATIO: ("image_aspect_ratio", "--max-image-aspect-ratio"),
}


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 20 * 1024 * 1024  # OpenAI's own limit per image
    max_pixels: int = 40_000_000  # e.g. 8000 x 5000; PIL's bomb warning starts at ~89M
    max_aspect_ratio: float = data_images.ImageLimits.max_aspect_ratio
    # JPEGs are decoded at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size. At the vision encoder's
    # input size its preprocess still only shrinks (EfficientNet's centre 7/8 crop aside). None: full size.
    draft_size: int | None = None
    allow_urls: bool = False
    # Networks an image URL may reach besides publicly routable addresses (e.g. an intranet image store).
    trusted_networks: tuple[Network, ...] = ()
    local_dir: Path | None = None
    # For the whole download, redirects included; resolving a host name is bounded by the system resolver's timeout.
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
    limits = data_images.ImageLimits(
        max_bytes=policy.max_bytes,
        max_pixels=policy.max_pixels,
        max_aspect_ratio=policy.max_aspect_ratio,
        draft_size=policy.draft_size,
    )
    try:
        return data_images.decode_image(data, where, limits)
    except BadSample as error:
        code, flags = REFUSALS.get(error.reason, ("invalid_image", None))
        raise ApiError(error.detail + (f" ({flags})" if flags else ""), where, code=code) from None


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


class _Refused(Exception):
    """A URL the policy does not allow: its address, its scheme, or one redirect too many."""


class _TooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def _fetch(url: str, where: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_urls:
        raise ApiError(
            f"{where}: http(s) image URLs are refused; send the image as a data: URL (or start the server with "
            "--allow-image-urls)",
            where,
            code="image_url_not_allowed",
        )
    # One message for every failure, details in the log only: a client that could tell "address not allowed" from
    # "connection refused" or "timed out" could map the networks the server sees.
    refused = ApiError(f"{where}: cannot fetch image URL", where, code="invalid_image")
    try:
        return _download(url, policy)
    except _TooLarge as error:
        raise _too_many_bytes(error.size, where, policy) from None
    except _Refused as error:
        log.warning("%s: image URL %s refused: %s", where, url, error)
        raise refused from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        log.info("%s: cannot fetch image URL %s: %s: %s", where, url, type(error).__name__, error)
        raise refused from None


def _download(url: str, policy: ImagePolicy) -> bytes:
    deadline = time.monotonic() + policy.url_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        with _connect(parts, policy.trusted_networks, deadline) as sock:
            connection = http.client.HTTPConnection(parts.hostname, parts.port)  # never connects: sock is set
            connection.sock = _DeadlineSocket(sock, deadline)
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            host = parts.netloc.rpartition("@")[2]  # credentials in the URL are not sent
            connection.request("GET", path, headers=HEADERS | {"Host": host})
            response = connection.getresponse()
            if response.status in REDIRECTS and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise http.client.HTTPException(f"HTTP status {response.status}")
            length = response.getheader("Content-Length", "")
            if length.isdigit() and int(length) > policy.max_bytes:
                raise _TooLarge(int(length))
            data = response.read(policy.max_bytes + 1)
            if len(data) > policy.max_bytes:
                raise _TooLarge(len(data))
            return data
    raise _Refused(f"more than {MAX_REDIRECTS} redirects")


def _connect(parts: urllib.parse.SplitResult, trusted: tuple[Network, ...], deadline: float) -> socket.socket:
    """A socket connected (with TLS for https) to an allowed address of the URL's host."""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Refused(f"{parts.scheme}:// is not http(s) or has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    resolved = [info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)]
    allowed = [address for address in resolved if _allowed(ipaddress.ip_address(address), trusted)]
    if not allowed:
        raise _Refused(f"{parts.hostname} is at {', '.join(resolved)}: not publicly routable nor trusted")
    # Connected to the address just checked, never to the name: resolving it again could give another one.
    sock = socket.create_connection((allowed[0], port), timeout=_seconds_left(deadline))
    if parts.scheme == "http":
        return sock
    try:
        sock.settimeout(_seconds_left(deadline))  # the handshake, all its reads together
        return ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
    except BaseException:
        sock.close()
        raise


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: tuple[Network, ...]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(address in network for network in trusted):
        return True
    # 6to4 (2002::/16) carries an IPv4 address a host with a 6to4 tunnel would send to; reserved covers ::/8,
    # where IPv4-compatible (::127.0.0.1) and NAT64 (64:ff9b::/96) addresses live.
    embedded = address.sixtofour if isinstance(address, ipaddress.IPv6Address) else None
    return all(
        a.is_global and not a.is_multicast and not a.is_reserved for a in (address, embedded) if a is not None
    )


def _seconds_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the image URL's deadline passed")
    return left


class _DeadlineSocket(io.RawIOBase):
    """A connected socket as http.client uses it (sendall, makefile), each operation given only the time left
    before the download's deadline: a plain timeout restarts with every byte, so a server dripping one byte a
    second would hold a worker forever.

    close() leaves the socket open: http.client closes a connection's socket while its response still reads from
    it (a real socket counts its makefile readers), and the socket's owner closes it."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(_seconds_left(self.deadline))
        self.sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.sock.settimeout(_seconds_left(self.deadline))
        return self.sock.recv_into(buffer)

    def close(self) -> None:
        pass


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
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, holding a worker forever.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):  # a FIFO, socket or device: never read
                raise ApiError(f"{where}: {url} is not a regular file", where, code="invalid_image")
            if info.st_size > policy.max_bytes:
                raise _too_many_bytes(info.st_size, where, policy)
            data = file.read(policy.max_bytes + 1)  # the file may have grown since fstat
    except OSError as error:
        raise ApiError(
            f"{where}: cannot read {url} ({error.strerror})", where, code="invalid_image"
        ) from None
    if len(data) > policy.max_bytes:
        raise _too_many_bytes(len(data), where, policy)
    return data


def _too_many_bytes(size: int, where: str, policy: ImagePolicy) -> ApiError:
    return ApiError(
        f"{where}: image is {size} bytes, over this server's limit of {policy.max_bytes} (--max-image-bytes)",
        where,
        code="image_too_large",
    )
