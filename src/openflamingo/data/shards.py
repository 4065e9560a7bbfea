"""WebDataset-compatible tar shards: naming them, reading samples with their byte offsets, and writing them.

A shard is a local path or a `pipe:COMMAND` whose stdout is the tar (`pipe:aws s3 cp s3://b/s-0001.tar -`).
Shards are read as streams (tarfile's "r|" mode), so both kinds behave alike. Each sample is returned with the byte
offset of its first tar header: the loader's checkpoint stores offsets, and a local shard resumes with one seek (a
pipe is re-read and the bytes before the offset skipped, which is the best a stream allows).
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand

from ..errors import InputError, MissingFileError
from .samples import TRUNCATED_TAR, UNREADABLE_SHARD, BadSample, Sample

PIPE_PREFIX = "pipe:"
_SKIP_CHUNK = 1 << 20


def expand_shards(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard URLs from brace patterns (`shard-{0000..0099}.tar`), directories (their *.tar), paths and pipes."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in braceexpand(str(item)):
            if not url.startswith(PIPE_PREFIX) and Path(url).is_dir():
                urls.extend(sorted(str(p) for p in Path(url).glob("*.tar")))
            else:
                urls.append(url)
    if not urls:
        raise InputError(f"no shards in {spec!r}")
    return urls


def check_local_shards(urls: list[str]) -> None:
    for url in urls:
        if not url.startswith(PIPE_PREFIX) and not Path(url).is_file():
            raise MissingFileError(f"shard {url} does not exist")


@dataclass
class RawSample:
    """A sample's members as stored (extension -> bytes), where it came from, and where the next one starts."""

    key: str
    members: dict[str, bytes]
    shard: str
    offset: int
    end: int


class _ShardStream:
    """A readable byte stream of one shard starting at `offset`; closing it stops a pipe's command."""

    def __init__(self, url: str, offset: int = 0):
        self.url = url
        self.process: subprocess.Popen | None = None
        if url.startswith(PIPE_PREFIX):
            self.process = subprocess.Popen(url[len(PIPE_PREFIX) :], shell=True, stdout=subprocess.PIPE)
            self.file: BinaryIO = self.process.stdout  # type: ignore[assignment]
            remaining = offset
            while remaining > 0:
                skipped = len(self.file.read(min(remaining, _SKIP_CHUNK)))
                if skipped == 0:
                    break
                remaining -= skipped
        else:
            self.file = open(url, "rb")  # closed by close()
            self.file.seek(offset)

    def command_failed(self, timeout: float | None = None) -> int | None:
        """The exit status of a pipe command that failed; None for files, success, or still running."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout) or None
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self.file.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the extension is the rest."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (extension if dot else "")


def read_shard(url: str, offset: int = 0) -> Iterator[RawSample]:
    """The samples of one shard from byte `offset` on (0 or a RawSample.offset/.end).

    A shard that cannot be opened raises BadSample(unreadable_shard) before any sample; a tar that ends early or
    has a corrupt header raises BadSample(truncated_tar) after the last complete sample.
    """
    try:
        stream = _ShardStream(url, offset)
    except OSError as error:
        raise BadSample(UNREADABLE_SHARD, f"{url}: {error}") from None
    try:
        try:
            yield from _read_tar_stream(url, stream, offset)
        except BadSample:
            # A pipe whose command failed (no such object, no access) reads as an empty or cut tar: say why.
            status = stream.command_failed(timeout=1.0)
            if status:
                raise BadSample(UNREADABLE_SHARD, f"{url}: command exited with status {status}") from None
            raise
        status = stream.command_failed(timeout=5.0)
        if status:
            raise BadSample(UNREADABLE_SHARD, f"{url}: command exited with status {status}")
    finally:
        stream.close()


def _read_tar_stream(url: str, stream: _ShardStream, base: int) -> Iterator[RawSample]:
    key: str | None = None
    members: dict[str, bytes] = {}
    start = base
    try:
        archive = tarfile.open(fileobj=stream.file, mode="r|")
        for info in archive:
            if not info.isfile():
                continue
            member_key, extension = split_member_name(info.name)
            if not extension or member_key.rpartition("/")[2] == "":
                continue  # not a sample member (no extension, hidden file)
            if member_key != key:
                if key is not None:
                    yield RawSample(key, members, url, start, base + info.offset)
                key, members, start = member_key, {}, base + info.offset
            data = archive.extractfile(info)
            members[extension] = data.read() if data is not None else b""
            if len(members[extension]) != info.size:
                raise tarfile.ReadError(
                    f"member {info.name} has {len(members[extension])} of {info.size} bytes"
                )
        end = base + archive.offset
    except (tarfile.TarError, EOFError, OSError) as error:
        # The sample being read when the tar broke is incomplete: it is dropped with the truncation.
        at = f"after sample {key!r}" if key is not None else "at its first sample"
        raise BadSample(TRUNCATED_TAR, f"{url}: tar ends or breaks {at} ({error})") from None
    if key is not None:
        yield RawSample(key, members, url, start, end)


def read_samples_at(url: str, offsets: Iterable[int]) -> dict[int, RawSample]:
    """The samples starting at the given byte offsets of one shard (to refill a restored shuffle buffer)."""
    wanted = sorted(set(offsets))
    found: dict[int, RawSample] = {}
    if url.startswith(PIPE_PREFIX):  # a stream cannot seek: one pass from the start
        for sample in read_shard(url, 0):
            if sample.offset in wanted:
                found[sample.offset] = sample
            if sample.offset >= wanted[-1]:
                break
    else:
        for offset in wanted:
            sample = next(read_shard(url, offset), None)
            if sample is not None and sample.offset == offset:
                found[offset] = sample
    missing = [offset for offset in wanted if offset not in found]
    if missing:
        raise InputError(
            f"shard {url} changed since the loader state was saved: no sample at byte offsets {missing}"
        )
    return found


def sanitize_key(key: str) -> str:
    """Keys may not contain dots (the extension starts at the first dot) nor slashes."""
    return key.replace(".", "_").replace("/", "_").replace(" ", "_") or "_"


class ShardWriter:
    """Writes samples to `directory/{prefix}-000000.tar, ...`, each shard under a temporary name until complete."""

    def __init__(self, directory: str | Path, samples_per_shard: int = 1000, prefix: str = "shard"):
        if samples_per_shard < 1:
            raise InputError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.shards: list[Path] = []
        self.samples_written = 0
        self._archive: tarfile.TarFile | None = None
        self._in_shard = 0
        self._keys: set[str] = set()

    def write(self, sample: Sample) -> None:
        if self._archive is None or self._in_shard >= self.samples_per_shard:
            self._next_shard()
        key = sanitize_key(sample.key)
        if key in self._keys:
            raise InputError(f"duplicate sample key {key!r} in shard {self.shards[-1]}")
        self._keys.add(key)
        for extension, data in sample.to_members().items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mode, info.mtime = (
                len(data),
                0o444,
                0,
            )  # fixed metadata: identical input, identical bytes
            self._archive.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.samples_written += 1

    def _next_shard(self) -> None:
        self._finish_shard()
        path = self.directory / f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append(path)
        self._archive = tarfile.open(f"{path}.tmp", "w")
        self._in_shard = 0
        self._keys = set()

    def _finish_shard(self) -> None:
        if self._archive is not None:
            self._archive.close()
            os.replace(f"{self.shards[-1]}.tmp", self.shards[-1])
            self._archive = None

    def close(self) -> None:
        self._finish_shard()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
