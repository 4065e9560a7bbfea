"""Converters, through the CLI, on real photos and small files in each format; `data inspect` on every result."""

from __future__ import annotations

import base64
import collections
import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from helpers.data import (
    ALLENNLP,
    PHOTOS,
    SKIMAGE,
    cli,
    image_bytes,
    img2dataset_shard,
    mmc4_line,
    preprocess,
)
from transformers import AutoTokenizer

from openflamingo.data import DatasetConfig, ImageItem, ShardLoader, TextItem, read_shard, sample_from_members
from openflamingo.data.convert import ConversionReport
from openflamingo.data.convert.easy_vqa import SHAPES, easy_vqa_samples, easy_vqa_shards
from openflamingo.data.convert.mmc4 import assign_images_to_sentences

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")


def read_samples(directory: Path) -> list:
    return [
        sample_from_members(raw.key, raw.members)
        for url in sorted(directory.glob("*.tar"))
        for raw in read_shard(str(url))
    ]


def convert_and_inspect(capsys, argv: list[str], out: Path) -> tuple[dict, dict]:
    assert cli(["data", "convert", *argv, "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert cli(["data", "inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["samples"] == report["samples"] > 0 and inspected["bad"] == {}
    return report, inspected


def test_captions_jsonl_and_csv_become_pairs_with_the_original_image_bytes(tmp_path, capsys):
    report, inspected = convert_and_inspect(
        capsys,
        ["--from", "captions", str(SKIMAGE / "captions.jsonl"), str(ALLENNLP / "captions.jsonl")],
        tmp_path / "jsonl",
    )
    assert report["samples"] == 4 + 5  # one pair per caption
    pairs = read_samples(tmp_path / "jsonl")
    by_caption = {p.caption: p for p in pairs}
    assert by_caption["a rocket standing on a launchpad"].image.data == PHOTOS["rocket.jpg"]
    assert by_caption["a rocket standing on a launchpad"].image.extension == "jpg"
    assert inspected["kinds"] == {"pair": 9}

    table = tmp_path / "captions.csv"
    with open(table, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "text"])
        writer.writerow(["horse.png", "a black-and-white silhouette of a horse"])
        writer.writerow(["missing.png", "no such file"])
    assert (
        cli(
            [
                "data",
                "convert",
                "--from",
                "captions",
                str(table),
                "--images",
                str(SKIMAGE / "images"),
                "--image-field",
                "file",
                "--caption-field",
                "text",
                "--out",
                str(tmp_path / "csv"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.splitlines()[0])["skipped"] == {"missing_image": 1}
    assert [p.caption for p in read_samples(tmp_path / "csv")] == ["a black-and-white silhouette of a horse"]


def test_vqa_and_nlvr2_become_documents_that_train_only_the_answer(tmp_path, capsys, tokenizer_dir):
    convert_and_inspect(capsys, ["--from", "vqa", str(ALLENNLP / "vqa.jsonl")], tmp_path / "vqa")
    question = read_samples(tmp_path / "vqa")[0]
    assert [type(i).__name__ for i in question.items] == ["ImageItem", "TextItem", "TextItem"]
    assert (
        question.items[1].text == "Question: What is on the curtains? Short answer:"
        and not question.items[1].loss
    )
    assert question.items[2].text == "Sailboats." and question.items[2].loss

    report, inspected = convert_and_inspect(
        capsys, ["--from", "nlvr2", str(ALLENNLP / "nlvr2.jsonl")], tmp_path / "nlvr2"
    )
    assert inspected["images_per_sample"] == {"2": 2}
    statement = read_samples(tmp_path / "nlvr2")[0]
    assert (
        statement.items[-1].text == "false"
        and statement.images[0].data == (ALLENNLP / "images/nlvr2/dev-850-3-img0.png").read_bytes()
    )
    assert cli(["data", "inspect", str(tmp_path / "nlvr2"), "--json", "--tokenizer", str(tokenizer_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["length_unit"] == "tokens"


def test_hungarian_assignment_is_one_to_one_where_argmax_is_not():
    similarity = np.array([[0.30, 0.35, 0.10], [0.10, 0.36, 0.10]])
    assert list(similarity.argmax(1)) == [
        1,
        1,
    ]  # MMC4's matched_text_index would stack both images on sentence 1
    assert assign_images_to_sentences(similarity, 0.24) == {0: 0, 1: 1}
    assert assign_images_to_sentences(similarity, 0.32) == {1: 1}


def test_mmc4_places_images_by_assignment_in_token_order_and_splits_surplus_images(tmp_path, capsys):
    sentences = ["A horse page.", "It runs.", "A printed page.", "The end."]
    # image_info lists the page first, but the horse's sentence comes first: the document follows the sentences
    images = [{"image_name": "page.png"}, {"image_name": "horse.png"}, {"image_name": "moon.png"}]
    similarity = [
        [0.10, 0.10, 0.36, 0.10],
        [0.35, 0.30, 0.36, 0.10],
        [0.05, 0.05, 0.10, 0.20],
    ]  # argmax: both on 2
    surplus = [{"image_base64": base64.b64encode(image_bytes(i)).decode()} for i in range(8)]
    lines = [
        mmc4_line(images, sentences, similarity),
        mmc4_line(surplus, [f"sentence {i}." for i in range(9)], (np.eye(8, 9) * 0.5).tolist()),
        "not json",
        mmc4_line(images, sentences, [[0.5] * 3]),  # wrong matrix shape
    ]
    source = tmp_path / "mmc4.jsonl"
    source.write_text("\n".join(lines) + "\n")
    report, _ = convert_and_inspect(
        capsys,
        ["--from", "mmc4", str(source), "--images", str(SKIMAGE / "images"), "--max-images", "3"],
        tmp_path / "out",
    )
    assert report["skipped"] == {"invalid_json": 1, "image_count_mismatch": 1}
    assert report["notes"]["images_below_similarity_threshold"] == 1  # the moon (0.20 < 0.24)
    documents = read_samples(tmp_path / "out")
    first = documents[0]
    kinds = ["image" if isinstance(i, ImageItem) else i.text for i in first.items]
    assert kinds == ["image", "A horse page.", "It runs.", "image", "A printed page.", "The end."]
    assert [i.data for i in first.images] == [PHOTOS["horse.png"], PHOTOS["page.png"]]
    # 8 images with at most 3 per document: 3 documents, no image and no sentence lost
    parts = documents[1:]
    assert [len(d.images) for d in parts] == [3, 3, 2]
    assert [i.data for d in parts for i in d.images] == [image_bytes(i) for i in range(8)]
    assert [i.text for d in parts for i in d.items if isinstance(i, TextItem)] == [
        f"sentence {i}." for i in range(9)
    ]


def test_obelics_parquet_rows_become_documents(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "texts": [["Intro.", None, "A horse."], [None, "A rocket."], [None, "Far away."], ["Only text."]],
            "images": [
                [None, {"bytes": PHOTOS["horse.png"], "path": None}, None],
                [{"bytes": None, "path": "rocket.jpg"}, None],
                [{"bytes": None, "path": "https://example.org/a.jpg"}, None],
                [None],
            ],
        },
        schema=pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(image_type))]),
    )
    pq.write_table(table, tmp_path / "obelics.parquet")
    report, _ = convert_and_inspect(
        capsys,
        ["--from", "obelics", str(tmp_path / "obelics.parquet"), "--images", str(SKIMAGE / "images")],
        tmp_path / "out",
    )
    assert report["samples"] == 2 and report["skipped"] == {"image_not_downloaded": 1, "no_image": 1}
    documents = read_samples(tmp_path / "out")
    assert [i.text if isinstance(i, TextItem) else "image" for i in documents[0].items] == [
        "Intro.",
        "image",
        "A horse.",
    ]
    assert documents[1].images[0].data == PHOTOS["rocket.jpg"]


def test_img2dataset_output_is_read_directly_and_converts(tmp_path, capsys, tokenizer_dir):
    laion = tmp_path / "laion"
    laion.mkdir()
    img2dataset_shard(laion / "00000.tar", 0)
    img2dataset_shard(laion / "00001.tar", 3)
    (laion / "00000.parquet").write_bytes(b"img2dataset writes these beside the tars")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = DatasetConfig(str(laion / "{00000..00001}.tar"), batch_size=6, epochs=1, num_workers=0)
    batch = next(iter(ShardLoader(config, tokenizer, preprocess)))
    assert batch["input_ids"].shape[0] == 6 and batch["num_images"].tolist() == [1] * 6

    report, _ = convert_and_inspect(capsys, ["--from", "img2dataset", str(laion)], tmp_path / "out")
    assert report["samples"] == 6
    assert sorted(p.caption for p in read_samples(tmp_path / "out"))[0] == "a girl by the water 0"

    files = tmp_path / "files" / "00000"  # img2dataset's `files` output format
    files.mkdir(parents=True)
    (files / "000000007.jpg").write_bytes(PHOTOS["rocket.jpg"])
    (files / "000000007.txt").write_text("a rocket")
    (files / "000000008.json").write_text("{}")  # a failed download leaves only its json
    report, _ = convert_and_inspect(
        capsys, ["--from", "img2dataset", str(tmp_path / "files")], tmp_path / "out2"
    )
    assert report["samples"] == 1


def test_easy_vqa_layouts(tmp_path):
    report = ConversionReport()
    pairs = list(itertools.islice(easy_vqa_samples("pairs", report), 3))
    assert all(p.kind == "pair" and p.caption.startswith("a ") for p in pairs)
    assert pairs[0].caption == "a blue rectangle"  # image 0: "what is the blue shape?" - "rectangle"
    vqa = next(easy_vqa_samples("vqa", report))
    assert (
        vqa.items[1].text == "Question: what is the blue shape? Short answer:"
        and vqa.items[2].text == "rectangle"
    )
    fewshot = next(easy_vqa_samples("fewshot", report, shots=4))
    assert len(fewshot.images) == 4 and len({i.data for i in fewshot.images}) == 4
    assert [i.loss for i in fewshot.items if isinstance(i, TextItem)] == [False, True] * 4


def test_easy_vqa_balanced_layout_cannot_be_answered_from_the_question():
    """On `vqa`, easy-VQA's yes/no answers follow from the question's kind (absent colours are asked about most);
    on `vqa-balanced` every kind has as many yes as no, and every open question is kept."""
    import easy_vqa

    kind_words = {*SHAPES, *easy_vqa.get_answers()} - {"yes", "no"}

    def by_kind(layout):
        counts = collections.defaultdict(collections.Counter)
        for document in easy_vqa_samples(layout, ConversionReport(), split="test"):
            question, answer = document.items[1].text, document.items[2].text
            words = question.removesuffix(" Short answer:").rstrip("?").split()
            kind = ("not" in words or "no" in words, next((w for w in words if w in kind_words), None))
            counts[kind if answer in ("yes", "no") else "open"][answer] += 1
        return counts

    full, balanced = by_kind("vqa"), by_kind("vqa-balanced")
    assert balanced["open"] == full["open"]
    kinds = [kind for kind in full if kind != "open"]
    # 8 colours + 3 shapes, negated or not
    assert len(kinds) == 22 and all(kind[1] is not None for kind in kinds)
    from_question = sum(max(full[k].values()) for k in kinds) / sum(full[k].total() for k in kinds)
    assert from_question > 0.8  # what a model that never looks scores on the full set's yes/no questions
    for kind in kinds:
        assert balanced[kind]["yes"] == balanced[kind]["no"] == min(full[kind]["yes"], full[kind]["no"]) > 0


def test_easy_vqa_shards_are_built_once_and_reused(tmp_path):
    first = easy_vqa_shards(tmp_path, layout="pairs", split="test", samples_per_shard=400)
    assert len(first) >= 2 and all(Path(p).is_file() for p in first)
    stamp = Path(first[0]).stat().st_mtime_ns
    assert easy_vqa_shards(tmp_path, layout="pairs", split="test", samples_per_shard=400) == first
    assert Path(first[0]).stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".easy-vqa*"))  # no temporary folder left behind


def test_convert_errors_name_what_is_wrong(tmp_path, capsys):
    assert (
        cli(["data", "convert", "--from", "vqa", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"image": "missing.jpg", "question": "q", "answers": ["a"]}\n')
    assert cli(["data", "convert", "--from", "vqa", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no sample could be converted" in capsys.readouterr().err
