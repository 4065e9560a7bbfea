"""Shards: writing, reading (paths, brace patterns, folders, pipe: commands), and bad input made for real."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from helpers.data import cli, document, image_bytes, pair, preprocess, write_shards
from PIL import Image
from transformers import AutoTokenizer

from openflamingo.data import (
    BadDataError,
    BadSample,
    DatasetConfig,
    ImageLimits,
    ShardLoader,
    decode_image,
    expand_shards,
    read_shard,
    sample_from_members,
)
from openflamingo.data.inspection import inspect_shards
from openflamingo.data.shards import read_samples_at

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def huge_png() -> bytes:
    """9000x9000 pixels (more than the default max_pixels) in a few kilobytes: a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    data = image_bytes(3, size=(64, 64), fmt="JPEG")
    return data[: len(data) // 2]


# name -> (members of one bad sample, reason the loader must give)
BAD_SAMPLES = {
    "zero_byte": ([("z.jpg", b""), ("z.txt", b"a cat")], "empty_image"),
    "not_an_image": ([("n.jpg", b"this is not a jpeg"), ("n.txt", b"a cat")], "undecodable_image"),
    "cut_jpeg": ([("c.jpg", truncated_jpeg()), ("c.txt", b"a cat")], "undecodable_image"),
    "bomb": ([("h.png", huge_png()), ("h.txt", b"a cat")], "image_too_large"),
    "no_caption": ([("m.jpg", image_bytes(1))], "missing_field"),
    "empty_caption": ([("e.jpg", image_bytes(2)), ("e.txt", b"   \n")], "empty_text"),
    "latin1_caption": ([("u.jpg", image_bytes(4)), ("u.txt", b"caf\xe9 au lait")], "invalid_utf8"),
    "two_images_one_caption": (
        [("t.jpg", image_bytes(5)), ("t.png", image_bytes(6)), ("t.txt", b"x")],
        "image_count_mismatch",
    ),
    "document_names_missing_image": (
        [
            (
                "d.doc.json",
                json.dumps({"items": [{"image": "0.png"}, {"text": "hi"}, {"image": "1.png"}]}).encode(),
            ),
            ("d.0.png", image_bytes(7)),
        ],
        "image_count_mismatch",
    ),
    "document_bad_json": ([("j.doc.json", b"{not json"), ("j.0.png", image_bytes(8))], "invalid_json"),
    "caption_with_image_token": (
        [("s.jpg", image_bytes(9)), ("s.txt", b"look <image> here")],
        "special_token_in_text",
    ),
}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def good_and_bad_shards(directory: Path) -> tuple[list[str], dict[str, int]]:
    """Shard 0: 6 good pairs with every kind of bad sample between them; shard 1: a tar cut in the middle."""
    members = []
    for i in range(6):
        members += [(f"good{i}.png", image_bytes(i)), (f"good{i}.txt", f"a red cat number {i}".encode())]
        for name, (bad, _) in list(BAD_SAMPLES.items())[i * 2 : i * 2 + 2]:
            members += [(f"{name}.{member.split('.', 1)[1]}", data) for member, data in bad]
    first = write_raw_tar(directory / "mixed.tar", members)
    whole = write_shards(directory / "cut", [pair(100 + i) for i in range(4)], 10)[0]
    third = [raw.offset for raw in read_shard(whole)][2]
    cut = directory / "cut.tar"
    cut.write_bytes(Path(whole).read_bytes()[: third + 700])  # inside the third sample
    expected: dict[str, int] = {"truncated_tar": 1}
    for _, reason in BAD_SAMPLES.values():
        expected[reason] = expected.get(reason, 0) + 1
    return [first, str(cut)], expected


def test_every_kind_of_bad_sample_is_skipped_and_counted_by_reason(tmp_path, tokenizer, caplog):
    shards, expected = good_and_bad_shards(tmp_path)
    config = DatasetConfig(
        shards, batch_size=4, epochs=1, num_workers=0, shuffle_buffer=1, max_bad_fraction=None
    )
    loader = ShardLoader(config, tokenizer, preprocess)
    with caplog.at_level(logging.WARNING, logger="openflamingo.data"):
        batches = list(loader)
    good = sum(batch["input_ids"].shape[0] for batch in batches)
    cut_shard_good = len(list(_complete_samples(shards[1])))
    assert good == 6 + cut_shard_good and cut_shard_good == 2
    assert loader.stats()["bad"] == expected
    assert "truncated_tar" in caplog.text and "empty_image" in caplog.text  # visible in the logs

    report = inspect_shards(shards)
    assert report["samples"] == good and report["bad"] == expected
    assert report["bad_by_shard"][shards[1]] == {"truncated_tar": 1}


def _complete_samples(url: str):
    try:
        yield from read_shard(url)
    except BadSample:
        return


def test_too_many_bad_samples_stop_the_run_with_an_error_naming_the_shard(tmp_path, tokenizer):
    shards, _ = good_and_bad_shards(tmp_path)
    config = DatasetConfig(shards[0], batch_size=2, epochs=1, num_workers=1, max_bad_fraction=0.5)
    with pytest.raises(BadDataError, match=r"mixed\.tar: \d+ of 17 samples bad"):
        list(ShardLoader(config, tokenizer, preprocess))  # raised in the worker process, re-raised here


def test_a_truncated_tar_is_read_up_to_its_last_complete_sample(tmp_path):
    path = Path(write_shards(tmp_path, [pair(i) for i in range(5)], 10)[0])
    data = path.read_bytes()
    offsets = [raw.offset for raw in read_shard(str(path))]
    path.write_bytes(data[: offsets[3] + 700])  # inside sample 3's first member
    keys = []
    with pytest.raises(BadSample) as error:
        for raw in read_shard(str(path)):
            keys.append(raw.key)
    assert error.value.reason == "truncated_tar" and keys == ["pair0000", "pair0001", "pair0002"]


def test_decode_limits_are_configurable():
    data = image_bytes(1, size=(200, 100))
    assert decode_image(data, "x.png").size == (200, 100)
    with pytest.raises(BadSample, match="image_too_large"):
        decode_image(data, "x.png", ImageLimits(max_pixels=100 * 100))
    with pytest.raises(BadSample, match="image_too_large"):
        decode_image(data, "x.png", ImageLimits(max_bytes=10))


def test_jpeg_draft_decoding_keeps_at_least_the_requested_size():
    data = image_bytes(1, size=(1000, 800), fmt="JPEG")
    image = decode_image(data, "x.jpg", ImageLimits(draft_size=224))
    assert image.mode == "RGB" and min(image.size) >= 224 and image.size[0] <= 500


def test_samples_round_trip_through_a_shard_and_writing_is_deterministic(tmp_path):
    samples = [pair(0), document(1, images=3), pair(2)]
    first = write_shards(tmp_path / "a", samples, 2)
    second = write_shards(tmp_path / "b", samples, 2)
    assert [Path(p).name for p in first] == ["shard-000000.tar", "shard-000001.tar"]
    assert [Path(p).read_bytes() for p in first] == [Path(p).read_bytes() for p in second]
    assert not list((tmp_path / "a").glob("*.tmp"))
    read = [sample_from_members(raw.key, raw.members) for url in first for raw in read_shard(url)]
    assert [s.kind for s in read] == ["pair", "document", "pair"]
    assert read[0].caption == "a red cat number 0" and read[0].image.data == samples[0].image.data
    assert [getattr(i, "text", None) for i in read[1].items] == [
        getattr(i, "text", None) for i in samples[1].items
    ]
    assert [i.data for i in read[1].images] == [i.data for i in samples[1].images]


def test_shards_are_named_by_paths_brace_patterns_folders_and_pipes(tmp_path):
    urls = write_shards(tmp_path, [pair(i) for i in range(6)], 2)
    assert expand_shards(str(tmp_path / "shard-{000000..000002}.tar")) == urls
    assert expand_shards(tmp_path) == urls
    piped = expand_shards(f"pipe:cat {tmp_path}/shard-{{000000..000002}}.tar")
    assert piped == [f"pipe:cat {url}" for url in urls]
    from_pipe = [(raw.key, raw.offset, raw.members) for raw in read_shard(piped[1])]
    from_file = [(raw.key, raw.offset, raw.members) for raw in read_shard(urls[1])]
    assert from_pipe == from_file and len(from_file) == 2
    # a saved offset finds the same sample through a seek (file) or by skipping bytes (pipe)
    offset = from_file[1][1]
    assert read_samples_at(piped[1], [offset])[offset].key == read_samples_at(urls[1], [offset])[offset].key


def test_a_failing_pipe_command_is_an_unreadable_shard_not_a_crash(tmp_path, tokenizer):
    good = write_shards(tmp_path, [pair(i) for i in range(3)], 10)
    shards = [f"pipe:cat {tmp_path}/missing.tar", *good]
    config = DatasetConfig(
        shards, batch_size=3, epochs=1, num_workers=0, shuffle_shards=False, max_bad_fraction=None
    )
    loader = ShardLoader(config, tokenizer, preprocess)
    assert sum(b["input_ids"].shape[0] for b in loader) == 3
    assert loader.stats()["bad"] == {"unreadable_shard": 1}


def test_pipe_shards_resume_exactly(tmp_path, tokenizer):
    write_shards(tmp_path, [pair(i) for i in range(12)], 4)
    config = DatasetConfig(
        f"pipe:cat {tmp_path}/shard-{{000000..000002}}.tar", batch_size=2, shuffle_buffer=4, num_workers=0
    )
    whole = [
        b["input_ids"] for _, b in zip(range(8), ShardLoader(config, tokenizer, preprocess), strict=False)
    ]
    loader = ShardLoader(config, tokenizer, preprocess)
    head = [b["input_ids"] for _, b in zip(range(3), loader, strict=False)]
    resumed = ShardLoader(config, tokenizer, preprocess)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    tail = [b["input_ids"] for _, b in zip(range(5), resumed, strict=False)]
    assert all((a == b).all() for a, b in zip(whole, head + tail, strict=True))


def test_missing_local_shard_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope-000001.tar"):
        ShardLoader(
            DatasetConfig(str(tmp_path / "nope-{000001..000002}.tar"), batch_size=1), tokenizer, preprocess
        )


def test_inspect_command_reports_bad_samples_as_json(tmp_path, capsys):
    shards, expected = good_and_bad_shards(tmp_path)
    assert cli(["data", "inspect", *shards, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 6 + len(list(_complete_samples(shards[1]))) and report["bad"] == expected
    assert cli(["data", "inspect", str(tmp_path / "absent.tar")]) == 2
    assert "absent.tar does not exist" in capsys.readouterr().err
