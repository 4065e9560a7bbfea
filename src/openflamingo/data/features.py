"""A cache of the frozen vision encoder's output per image: training reads patch tokens instead of decoding,
preprocessing and encoding every image at every step.

One safetensors file per (shards, encoder): `features` (N, num_tokens, dim) and `digests` (N, 32) uint8, the sha256
of each image file's bytes (identical images share a row); the images that cannot be used are kept as
`bad_digests` (M, 32) with `bad_reasons` (M,) (indices into BAD_REASONS), so the loader skips and counts the same
samples with the cache as without. The metadata's `fingerprint` names the encoder (its config and weights); a
cache made by another encoder is refused. `output_dtype` is the dtype the encoder hands the perceiver, which
lookups return; `features` is stored in it, or in a narrower `feature_dtype` chosen at build time (fp16/bf16 halve
an fp32 encoder's cache, see feature_cache_bytes).

The file is written as a stream (rows as they are encoded, the header last, into space reserved at the start) so a
cache larger than memory can be built, and it is read memory-mapped, one row per lookup: all DataLoader workers
share the page cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..errors import InputError, MissingFileError
from .images import ImageLimits, decode_image
from .samples import BAD_REASONS, UNDECODABLE_IMAGE, BadSample, is_image_member, sample_from_members
from .shards import read_shard

logger = logging.getLogger(__name__)

HEADER_BYTES = 1 << 16  # reserved for the safetensors header; the format allows padding it with spaces
DIGEST_BYTES = 32  # sha256
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
# `feature_dtype` choices, named as precision.* names them in run configs.
FEATURE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class StaleFeatureCacheError(ValueError):
    """An image or encoder the feature cache was not built for."""


class UnreadableFeatureCacheError(ValueError):
    """A feature cache file that is truncated, corrupt or not a feature cache."""


def feature_cache_bytes(
    num_images: int, num_tokens: int, dim: int, dtype: torch.dtype, num_bad: int = 0
) -> int:
    """The size of a cache file, exactly: the reserved header, then per image its tokens and its digest, per bad
    image its digest and one reason byte. OpenFlamingo's ViT-L/14 in bf16: 256 x 1024 x 2 + 32 = 524,320 bytes per
    image, 524 GB (0.48 TiB) per million images."""
    row = num_tokens * dim * dtype.itemsize + DIGEST_BYTES
    return HEADER_BYTES + num_images * row + num_bad * (DIGEST_BYTES + 1)


def encoder_fingerprint(model) -> str:
    """sha256 over the vision config and the encoder's state dict (names, dtypes, shapes, bytes). The config's
    `path` is left out: the weights themselves are hashed, so moving them does not invalidate a cache."""
    config = {k: v for k, v in model.config.vision.to_dict().items() if k != "path"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.vision_encoder.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_feature_cache(
    shards: list[str],
    model,
    path: str | os.PathLike,
    batch_size: int | None = None,
    progress: bool = True,
    limits: ImageLimits | None = None,
    feature_dtype: torch.dtype | None = None,
) -> Path:
    """Encode every distinct image of `shards` (decoded and preprocessed as the loader does) into the cache at
    `path`, written atomically. Unreadable shard tails and bad samples are skipped as the loader skips them.
    `batch_size` defaults to 16 images on a CPU (EfficientNet-Lite0 on 2 cores: 6.5 ms/image at 16, 11 at 64: the
    activations of small batches stay in cache) and 256 on a GPU.

    The encoder runs as in a training step: under autocast to its narrowest parameter dtype when its matrices are
    stored in bf16/fp16 (precision.frozen_dtype = "bf16" keeps vectors in fp32 and needs bf16 autocast), plainly
    otherwise. Rows are stored in the dtype of its output (exactly what the perceiver would get) unless
    `feature_dtype` asks for another (fp16/bf16 halve the disk of an fp32 output; lookups cast back). With
    `progress`, a bar counts images (images/s) and a last line on stderr reports the images, time and bytes
    written."""
    encoder = model.vision_encoder
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(encoder.parameters()).device
    floats = {p.dtype for p in encoder.parameters() if p.is_floating_point()}
    narrow = min(floats, key=lambda dtype: dtype.itemsize)
    amp = narrow if narrow.itemsize < 4 else None
    batch_size = batch_size or (16 if device.type == "cpu" else 256)
    output_dtype: torch.dtype | None = None
    digests: list[bytes] = []
    seen: set[bytes] = set()
    bad: dict[bytes, int] = {}
    pending: list[tuple[bytes, torch.Tensor]] = []
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    was_training = encoder.training
    encoder.eval()  # BatchNorm statistics must neither be used per batch nor drift
    started = time.perf_counter()
    bar = tqdm(desc="feature cache", unit="image", disable=not progress, file=sys.stderr)
    try:
        with os.fdopen(fd, "wb") as file, torch.no_grad():
            file.seek(HEADER_BYTES)

            def flush() -> None:
                nonlocal output_dtype
                pixels = torch.stack([p for _, p in pending]).to(device)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    tokens = encoder(pixels)
                output_dtype = output_dtype or tokens.dtype
                file.write(_raw(tokens.to(feature_dtype or output_dtype)))
                digests.extend(d for d, _ in pending)
                bar.update(len(pending))
                pending.clear()

            for i, url in enumerate(shards):
                bar.set_postfix(shard=f"{i + 1}/{len(shards)}", bad=len(bad))
                for digest, pixels in _shard_images(url, encoder, limits, seen, bad):
                    pending.append((digest, pixels))
                    if len(pending) == batch_size:
                        flush()
            if pending:
                flush()
            output_dtype = output_dtype or encoder._parameter_dtype()  # no image: nothing was encoded
            stored = feature_dtype or output_dtype
            tensors = {
                "features": (
                    _DTYPE_NAMES[stored],
                    [len(digests), encoder.num_tokens, encoder.dim],
                    len(digests) * encoder.num_tokens * encoder.dim * stored.itemsize,
                ),
                "digests": ("U8", [len(digests), DIGEST_BYTES], b"".join(digests)),
                "bad_digests": ("U8", [len(bad), DIGEST_BYTES], b"".join(bad)),
                "bad_reasons": ("U8", [len(bad)], bytes(bad.values())),
            }
            metadata = {"fingerprint": encoder_fingerprint(model), "output_dtype": _DTYPE_NAMES[output_dtype]}
            _write_header(file, tensors, metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        encoder.train(was_training)
        bar.close()
    if progress:
        logger.info(build_report(path, len(digests), len(bad), time.perf_counter() - started))
    return path


def build_report(path: Path, num_images: int, num_bad: int, seconds: float) -> str:
    """One line: how many images were encoded how fast, and how many bytes the cache takes."""
    size = path.stat().st_size
    per_image = (size - HEADER_BYTES - num_bad * (DIGEST_BYTES + 1)) // max(num_images, 1)
    return (
        f"feature cache {path}: {num_images} images ({num_bad} bad, skipped) in {seconds:.1f} s = "
        f"{num_images / max(seconds, 1e-9):.1f} images/s; wrote {size:,} bytes ({size / 2**20:.1f} MiB, "
        f"{per_image:,} bytes per image)"
    )


def _shard_images(url: str, encoder, limits: ImageLimits | None, seen: set[bytes], bad: dict[bytes, int]):
    """(digest, preprocessed pixels) of each image of `url` not seen before; bad ones go to `bad` instead."""
    try:
        for raw in read_shard(url):
            # Most samples repeat images already seen (one per question of an image): skip them before parsing.
            digests = {
                data: hashlib.sha256(data).digest()
                for name, data in raw.members.items()
                if is_image_member(name)
            }
            if digests and all(digest in seen for digest in digests.values()):
                continue
            try:
                images = sample_from_members(raw.key, raw.members).images
            except BadSample:
                continue  # the loader skips the whole sample, images and all
            for item in images:
                digest = digests.get(item.data) or hashlib.sha256(item.data).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                try:
                    image = decode_image(item.data, f"{raw.key}.{item.extension}", limits)
                    try:
                        pixels = encoder.preprocess_image(image)
                    except Exception as error:  # as the loader: a failed preprocess is an undecodable image
                        raise BadSample(UNDECODABLE_IMAGE, f"preprocess failed: {error}") from None
                except BadSample as error:
                    bad[digest] = BAD_REASONS.index(error.reason)
                    continue
                yield digest, pixels
    except BadSample:
        return  # a truncated or unreadable shard ends here, as it does for the loader


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _write_header(
    file, tensors: dict[str, tuple[str, list[int], int | bytes]], metadata: dict[str, str]
) -> None:
    """Append the tensors given as bytes after the streamed `features`, then fill the reserved header space.
    Entries: name -> (dtype, shape, bytes or, for data already written, its length)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        size = data if isinstance(data, int) else len(data)
        if not isinstance(data, int):
            file.write(data)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    if len(text) > HEADER_BYTES - 8:
        raise InputError(f"feature cache header of {len(text)} bytes does not fit in {HEADER_BYTES}")
    file.seek(0)
    file.write(struct.pack("<Q", HEADER_BYTES - 8) + text.ljust(HEADER_BYTES - 8))


class FeatureCache:
    """Rows of a feature cache by image bytes. The file is opened on first lookup, in the process that looks up
    (a DataLoader worker), and reopened after pickling. `dtype` is what lookups return (the encoder's output
    dtype), `storage_dtype` what the file holds."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"feature cache {self.path} does not exist")
        try:
            with safe_open(str(self.path), "pt") as file:
                metadata = file.metadata() or {}
                shapes = {name: file.get_slice(name).get_shape() for name in file.keys()}
                stored = file.get_slice("features").get_dtype() if "features" in shapes else None
        except (SafetensorError, OSError) as error:
            self._unreadable(str(error).splitlines()[0])
        missing = [
            name for name in ("features", "digests", "bad_digests", "bad_reasons") if name not in shapes
        ]
        if missing:
            self._unreadable(f"no tensor {missing[0]!r}")
        num_images, num_bad = shapes["features"][0], shapes["bad_reasons"][0]
        expected = {"digests": [num_images, DIGEST_BYTES], "bad_digests": [num_bad, DIGEST_BYTES]}
        for name, shape in expected.items():
            if shapes[name] != shape:
                self._unreadable(f"{name} has shape {shapes[name]}, expected {shape}")
        if len(shapes["features"]) != 3 or stored not in _DTYPES:
            self._unreadable(
                f"features are {stored} {shapes['features']}, expected float (N, num_tokens, dim)"
            )
        self.fingerprint = metadata.get("fingerprint")
        self.shape = tuple(shapes["features"][1:])  # (num_tokens, dim)
        self.storage_dtype = _DTYPES[stored]
        self.dtype = _DTYPES.get(metadata.get("output_dtype"), self.storage_dtype)
        self.num_images = num_images
        self._file = None
        self._rows: dict[bytes, int] | None = None
        self._bad: dict[bytes, str] = {}

    def _unreadable(self, why: str):
        raise UnreadableFeatureCacheError(
            f"feature cache {self.path} cannot be read ({why}): it is truncated, corrupt or not a feature cache; "
            "delete the file to rebuild it"
        ) from None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_rows": None, "_bad": {}}

    def _open(self) -> None:
        self._file = safe_open(str(self.path), "pt")
        digests = self._file.get_tensor("digests").numpy()
        self._rows = {row.tobytes(): i for i, row in enumerate(digests)}
        reasons = self._file.get_tensor("bad_reasons").tolist()
        bad = self._file.get_tensor("bad_digests").numpy()
        self._bad = {row.tobytes(): BAD_REASONS[r] for row, r in zip(bad, reasons, strict=True)}

    def lookup(self, data: bytes, name: str) -> torch.Tensor:
        """The encoder's tokens (num_tokens, dim) for the image file `data` (`name` says where it is from, for
        errors); raises BadSample for an image the encoder could not take (as decoding it would)."""
        if self._rows is None:
            self._open()
        digest = hashlib.sha256(data).digest()
        row = self._rows.get(digest)
        if row is not None:
            return self._file.get_slice("features")[row].to(self.dtype)
        if digest in self._bad:
            raise BadSample(
                self._bad[digest], f"image {name} was {self._bad[digest]} when {self.path} was built"
            )
        raise StaleFeatureCacheError(
            f"image {name} is not in the feature cache {self.path}: the cache is stale (the shards changed since it "
            "was built); delete the file to rebuild it"
        )

    def check(self, model) -> None:
        """Raise if this cache was built by another vision encoder (config or weights) than `model`'s."""
        self.check_fingerprint(encoder_fingerprint(model))

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raise if this cache was not built by the encoder whose encoder_fingerprint() is `fingerprint`."""
        if self.fingerprint != fingerprint:
            raise StaleFeatureCacheError(
                f"feature cache {self.path} was built by another vision encoder (config, weights or dtype differ "
                "from this model's); delete the file to rebuild it"
            )
