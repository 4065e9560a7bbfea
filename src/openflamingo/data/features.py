"""A cache of the frozen vision encoder's output per image: training reads patch tokens instead of decoding,
preprocessing and encoding every image at every step.

One safetensors file per (shards, encoder): `features` (N, num_tokens, dim) in the encoder's parameter dtype and
`digests` (N, 32) uint8, the sha256 of each image file's bytes (identical images share a row); the images that
cannot be used are kept as `bad_digests` (M, 32) with `bad_reasons` (M,) (indices into BAD_REASONS), so the loader
skips and counts the same samples with the cache as without. The metadata's `fingerprint` names the encoder (its
config and weights); a cache made by another encoder is refused.

The file is written as a stream (rows as they are encoded, the header last, into space reserved at the start) so a
cache larger than memory can be built, and it is read memory-mapped, one row per lookup: all DataLoader workers
share the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .images import ImageLimits, decode_image
from .samples import BAD_REASONS, UNDECODABLE_IMAGE, BadSample, is_image_member, sample_from_members
from .shards import read_shard

HEADER_BYTES = 1 << 16  # reserved for the safetensors header; the format allows padding it with spaces
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class StaleFeatureCacheError(ValueError):
    """An image or encoder the feature cache was not built for."""


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
) -> Path:
    """Encode every distinct image of `shards` (decoded and preprocessed as the loader does) into the cache at
    `path`, written atomically. Unreadable shard tails and bad samples are skipped as the loader skips them.
    `batch_size` defaults to 16 images on a CPU (EfficientNet-Lite0 on 2 cores: 6.5 ms/image at 16, 11 at 64: the
    activations of small batches stay in cache) and 256 on a GPU."""
    encoder = model.vision_encoder
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device, dtype = next(encoder.parameters()).device, encoder._parameter_dtype()
    batch_size = batch_size or (16 if device.type == "cpu" else 256)
    digests: list[bytes] = []
    seen: set[bytes] = set()
    bad: dict[bytes, int] = {}
    pending: list[tuple[bytes, torch.Tensor]] = []
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    was_training = encoder.training
    encoder.eval()  # BatchNorm statistics must neither be used per batch nor drift
    try:
        with os.fdopen(fd, "wb") as file, torch.no_grad():
            file.seek(HEADER_BYTES)

            def flush() -> None:
                pixels = torch.stack([p for _, p in pending]).to(device=device, dtype=dtype)
                file.write(_raw(encoder(pixels).to(dtype)))
                digests.extend(d for d, _ in pending)
                pending.clear()

            bar = tqdm(shards, desc="feature cache", unit="shard", disable=not progress)
            for url in bar:
                for digest, pixels in _shard_images(url, encoder, limits, seen, bad):
                    pending.append((digest, pixels))
                    if len(pending) == batch_size:
                        flush()
                bar.set_postfix(images=len(digests) + len(pending), bad=len(bad))
            if pending:
                flush()
            bar.close()
            tensors = {
                "features": (
                    _DTYPE_NAMES[dtype],
                    [len(digests), encoder.num_tokens, encoder.dim],
                    len(digests) * encoder.num_tokens * encoder.dim * dtype.itemsize,
                ),
                "digests": ("U8", [len(digests), 32], b"".join(digests)),
                "bad_digests": ("U8", [len(bad), 32], b"".join(bad)),
                "bad_reasons": ("U8", [len(bad)], bytes(bad.values())),
            }
            _write_header(file, tensors, {"fingerprint": encoder_fingerprint(model)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        encoder.train(was_training)
    return path


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
        raise ValueError(f"feature cache header of {len(text)} bytes does not fit in {HEADER_BYTES}")
    file.seek(0)
    file.write(struct.pack("<Q", HEADER_BYTES - 8) + text.ljust(HEADER_BYTES - 8))


class FeatureCache:
    """Rows of a feature cache by image bytes. The file is opened on first lookup, in the process that looks up
    (a DataLoader worker), and reopened after pickling."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature cache {self.path} does not exist")
        with safe_open(str(self.path), "pt") as file:
            self.fingerprint = (file.metadata() or {}).get("fingerprint")
            features = file.get_slice("features")
            self.shape = tuple(features.get_shape()[1:])  # (num_tokens, dim)
            self.dtype = {name: dtype for dtype, name in _DTYPE_NAMES.items()}[features.get_dtype()]
            self.num_images = features.get_shape()[0]
        self._file = None
        self._rows: dict[bytes, int] | None = None
        self._bad: dict[bytes, str] = {}

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
            return self._file.get_slice("features")[row]
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
        if self.fingerprint != encoder_fingerprint(model):
            raise StaleFeatureCacheError(
                f"feature cache {self.path} was built by another vision encoder (config, weights or dtype differ "
                "from this model's); delete the file to rebuild it"
            )
