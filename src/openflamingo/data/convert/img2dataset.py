"""img2dataset output -> pair shards.

img2dataset's `webdataset` output (tar shards of KEY.jpg/KEY.txt/KEY.json) is already this project's pair format
and the loader reads it directly; converting re-shards it and drops what would be skipped anyway (failed
downloads, empty captions, broken tars). Its `files` output (folders of KEY.jpg/KEY.txt/KEY.json) converts too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..samples import BadSample, ImageTextPair, sample_from_members
from ..shards import expand_shards, read_shard, split_member_name
from .common import ConversionReport


def _members_from_files(directory: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    groups: dict[str, dict[str, Path]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.suffix in (".jpg", ".jpeg", ".png", ".webp", ".txt", ".json"):
            key, extension = split_member_name(str(path.relative_to(directory)))
            groups.setdefault(key, {})[extension] = path
    for key, files in groups.items():
        if set(files) == {"json"}:
            continue  # img2dataset keeps a json for failed downloads; nothing to convert
        yield key, {extension: path.read_bytes() for extension, path in files.items()}


def img2dataset_samples(source: str, report: ConversionReport) -> Iterator[ImageTextPair]:
    path = Path(source)
    if path.is_dir() and not any(path.glob("*.tar")):
        raw_samples = ((key, members, str(path)) for key, members in _members_from_files(path))
    else:
        raw_samples = _members_from_shards(expand_shards(source), report)
    for key, members, origin in raw_samples:
        try:
            sample = sample_from_members(key, members)
        except BadSample as bad:
            report.skip(bad.reason)
            continue
        if not isinstance(sample, ImageTextPair):
            report.skip("not_a_pair")
            continue
        sample.metadata = {**sample.metadata, "source_shard": origin}
        yield sample


def _members_from_shards(
    urls: list[str], report: ConversionReport
) -> Iterator[tuple[str, dict[str, bytes], str]]:
    for shard_index, url in enumerate(urls):
        try:
            for raw in read_shard(url):
                # Keys repeat across img2dataset shards only if they were renamed; prefix to be safe.
                yield f"{shard_index:05d}_{raw.key}", raw.members, url
        except BadSample as bad:
            report.skip(bad.reason)
