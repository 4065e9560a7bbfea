"""What a set of shards holds: good samples, bad ones by reason, images per sample, text lengths.

Reads every sample the way the loader does (parse, decode every image, and with a tokenizer format and truncate),
so the bad counts are the ones a training run would skip.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from .images import ImageLimits, decode_image
from .samples import BadSample, Conversation, sample_from_members
from .shards import expand_shards, read_shard
from .text import SampleFormatter


def _bucket(length: int) -> str:
    """Power-of-two bins: 0-15, 16-31, 32-63, ..."""
    if length < 16:
        return "0-15"
    low = 1 << (length.bit_length() - 1)
    return f"{low}-{2 * low - 1}"


def inspect_shards(
    shards: str | list[str],
    formatter: SampleFormatter | None = None,
    limits: ImageLimits | None = None,
    max_samples: int | None = None,
) -> dict[str, Any]:
    urls = expand_shards(shards)
    bad: Counter[str] = Counter()
    bad_by_shard: dict[str, Counter[str]] = {}
    kinds: Counter[str] = Counter()
    images_per_sample: Counter[int] = Counter()
    lengths: list[int] = []
    truncated = 0
    seen = 0

    def count_bad(url: str, reason: str) -> None:
        bad[reason] += 1
        bad_by_shard.setdefault(url, Counter())[reason] += 1

    for url in urls:
        try:
            for raw in read_shard(url):
                if max_samples is not None and seen >= max_samples:
                    break
                seen += 1
                try:
                    sample = sample_from_members(raw.key, raw.members)
                    for image in sample.images:
                        decode_image(image.data, f"{raw.key}.{image.extension}", limits)
                except BadSample as error:
                    count_bad(url, error.reason)
                    continue
                kinds[sample.kind] += 1
                images_per_sample[len(sample.images)] += 1
                if formatter is not None:
                    tokens = formatter.format_sample(sample)
                    lengths.append(len(tokens.input_ids))
                    truncated += int(tokens.truncated)
                else:
                    texts = (
                        [turn.text for turn in sample.turns]
                        if isinstance(sample, Conversation)
                        else [item.text for item in sample.items if hasattr(item, "text")]
                    )
                    lengths.append(sum(len(text.split()) for text in texts))
        except BadSample as error:  # truncated or unreadable shard
            count_bad(url, error.reason)
    return {
        "shards": len(urls),
        "samples": sum(kinds.values()),
        "bad": dict(sorted(bad.items())),
        "bad_by_shard": {url: dict(sorted(c.items())) for url, c in bad_by_shard.items()},
        "kinds": dict(sorted(kinds.items())),
        "images_per_sample": {str(k): v for k, v in sorted(images_per_sample.items())},
        "length_unit": "tokens" if formatter is not None else "words",
        "length_histogram": {k: v for k, v in sorted(Counter(map(_bucket, lengths)).items(), key=_bin_start)},
        "length": _summary(lengths),
        **({"truncated": truncated} if formatter is not None else {}),
    }


def _bin_start(entry: tuple[str, int]) -> int:
    return int(entry[0].split("-")[0])


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 1),
        "max": max(values),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    unit = report["length_unit"]
    lines = [
        f"shards: {report['shards']}",
        f"samples: {report['samples']} good ({', '.join(f'{k} {v}' for k, v in report['kinds'].items()) or 'none'})",
        f"bad: {sum(report['bad'].values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in report['bad'].items())})" if report["bad"] else ""),
    ]
    for url, reasons in report["bad_by_shard"].items():
        lines.append(f"  {url}: {', '.join(f'{k} {v}' for k, v in reasons.items())}")
    lines.append(
        "images per sample: " + ", ".join(f"{k}: {v}" for k, v in report["images_per_sample"].items())
    )
    if report["length"]:
        summary = report["length"]
        lines.append(
            f"length ({unit}): min {summary['min']}, median {summary['median']}, mean {summary['mean']}, "
            f"max {summary['max']}"
            + (f"; truncated to fit: {report['truncated']}" if "truncated" in report else "")
        )
        peak = max(report["length_histogram"].values())
        for bucket, count in report["length_histogram"].items():
            lines.append(f"  {bucket:>11} {count:>8} {'#' * max(1, round(40 * count / peak))}")
    if unit == "words":
        lines.append("(lengths in words; give --tokenizer for token lengths)")
    return "\n".join(lines)
