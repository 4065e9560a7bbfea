"""Formatting, labels and truncation; padded and packed batches, and what the model makes of them."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers.data import image_bytes
from helpers.model import tiny_config
from tokenizers import processors
from transformers import AutoTokenizer

from openflamingo import Flamingo, add_special_tokens, build_flamingo
from openflamingo.data import (
    FormatConfig,
    ImageItem,
    PackingConfig,
    SampleFormatter,
    TextItem,
    collate_packed,
    collate_padded,
    pack_rows,
)
from openflamingo.data.batching import Batcher, PreparedSample
from openflamingo.data.images import decode_image

IGNORE = -100


@pytest.fixture
def tokenizer(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    add_special_tokens(tokenizer)
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def image(i: int = 0) -> ImageItem:
    return ImageItem(image_bytes(i), "png")


def test_pair_is_image_caption_endofchunk_eos_with_only_the_image_token_masked(tokenizer):
    formatter = SampleFormatter(tokenizer)
    out = formatter.format([image(), TextItem("a red cat")])
    media, eoc, eos = formatter.media_id, formatter.end_of_chunk_id, tokenizer.eos_token_id
    caption = ids(tokenizer, "a red cat")
    assert out.input_ids == [media, *caption, eoc, eos]
    assert out.labels == [IGNORE, *caption, eoc, eos]
    assert tokenizer.decode(out.input_ids) == "<image>a red cat<|endofchunk|></s>"
    assert out.num_images == 1 and not out.truncated


def test_document_masks_text_before_the_first_image_and_prompts_but_trains_answers(tokenizer):
    items = [
        TextItem("an intro"),
        image(1),
        TextItem("Question: what is it?", loss=False),
        TextItem("a dog"),
        image(2),
        TextItem("a bird"),
    ]
    formatter = SampleFormatter(tokenizer)
    out = formatter.format(items)
    assert tokenizer.decode(out.input_ids) == (
        "an intro<image>Question: what is it? a dog<|endofchunk|><image>a bird<|endofchunk|></s>"
    )
    trained = tokenizer.decode([t for t in out.labels if t != IGNORE])
    assert trained == " a dog<|endofchunk|>a bird<|endofchunk|></s>"
    unmasked = SampleFormatter(tokenizer, FormatConfig(mask_text_before_first_image=False)).format(items)
    assert tokenizer.decode([t for t in unmasked.labels if t != IGNORE]).startswith("an intro a dog")


def test_bos_of_tokenizers_that_add_one_comes_first_and_is_not_a_target(tokenizer):
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    out = SampleFormatter(tokenizer).format([image(), TextItem("a cat")])
    assert out.input_ids[:2] == [bos, add_special_tokens(tokenizer).media] and out.labels[0] == IGNORE


def test_truncation_drops_whole_image_chunks_and_keeps_endofchunk_and_eos(tokenizer):
    items = [
        item
        for i in range(6)
        for item in (image(i), TextItem(f"the photo number {i} shows a cat in the park"))
    ]
    formatter = SampleFormatter(tokenizer, FormatConfig(max_tokens=40, max_images=6))
    out = formatter.format(items)
    assert out.truncated and 1 <= out.num_images < 6
    assert out.input_ids.count(formatter.media_id) == out.num_images  # never an <image> without its image
    assert out.input_ids.count(formatter.end_of_chunk_id) == out.num_images
    assert len(out.input_ids) <= 40 and out.input_ids[-2:] == [
        formatter.end_of_chunk_id,
        tokenizer.eos_token_id,
    ]

    capped = SampleFormatter(tokenizer, FormatConfig(max_tokens=1000, max_images=2)).format(items)
    assert capped.num_images == 2 and capped.truncated


def test_a_caption_longer_than_the_budget_is_cut_but_keeps_its_endings_and_is_reported(tokenizer):
    formatter = SampleFormatter(tokenizer, FormatConfig(max_tokens=12))
    out = formatter.format([image(), TextItem("a red cat sits in the park with a dog and a bird on a tree")])
    assert len(out.input_ids) == 12 and out.truncated
    assert out.input_ids[0] == formatter.media_id
    assert out.input_ids[-2:] == [formatter.end_of_chunk_id, tokenizer.eos_token_id]
    assert out.labels[-2:] == [formatter.end_of_chunk_id, tokenizer.eos_token_id]


def test_a_long_text_before_the_first_image_is_cut_from_its_start(tokenizer):
    formatter = SampleFormatter(tokenizer, FormatConfig(max_tokens=16))
    out = formatter.format(
        [
            TextItem("the man and the woman walk in the park on the street by the lake " * 3),
            image(),
            TextItem("a cat"),
        ]
    )
    assert out.num_images == 1 and len(out.input_ids) == 16
    assert tokenizer.decode(out.input_ids).endswith("<image>a cat<|endofchunk|></s>")


def test_pack_rows_fills_rows_first_fit_decreasing_within_token_and_image_budgets():
    lengths = [50, 30, 30, 20, 60, 10, 45]
    images = [1, 1, 2, 1, 3, 1, 1]
    rows = pack_rows(lengths, images, num_rows=3, row_tokens=100, max_images_per_row=4)
    placed = [i for row in rows for i in row]
    assert len(placed) == len(set(placed)) == 7
    for row in rows:
        assert sum(lengths[i] for i in row) <= 100 and sum(images[i] for i in row) <= 4
        assert row == sorted(row)  # arrival order within a row
    assert 4 in rows[0]  # the longest sample opens the first row
    assert pack_rows([80, 80], [1, 1], num_rows=1, row_tokens=100, max_images_per_row=4) == [[0]]


def prepared(tokenizer, formatter, text: str, colours: list[int]) -> PreparedSample:
    items = [x for c in colours for x in (image(c), TextItem(text))]
    out = formatter.format(items)
    pixels = [torch.full((3, 4, 4), float(c)) for c in colours]
    return PreparedSample(out.input_ids, out.labels, pixels)


def test_packed_batch_numbers_documents_concatenates_their_images_and_masks_padding(tokenizer):
    formatter = SampleFormatter(tokenizer)
    docs = [
        prepared(tokenizer, formatter, "a cat", [1]),
        prepared(tokenizer, formatter, "two dogs", [2, 3]),
        prepared(tokenizer, formatter, "a bird", [4]),
    ]
    batch = collate_packed([[docs[0], docs[1]], [docs[2]]], formatter.pad_id)
    first, second = len(docs[0]), len(docs[1])
    assert batch["document_ids"][0].tolist() == [1] * first + [2] * second
    row1 = batch["document_ids"][1].tolist()
    assert row1 == [1] * len(docs[2]) + [0] * (first + second - len(docs[2]))
    assert torch.equal(batch["attention_mask"], (batch["document_ids"] > 0).long())
    assert (batch["labels"][1][len(docs[2]) :] == IGNORE).all()
    assert (batch["input_ids"][1][len(docs[2]) :] == formatter.pad_id).all()
    assert batch["num_images"].tolist() == [3, 1]
    assert [batch["images"][0, i, 0, 0, 0, 0].item() for i in range(3)] == [
        1.0,
        2.0,
        3.0,
    ]  # in document order
    assert (batch["images"][1, 1:] == 0).all()
    media = (batch["input_ids"] == formatter.media_id).sum(1)
    assert media.tolist() == batch["num_images"].tolist()


def test_padded_batch_keeps_eos_labels_even_when_pad_is_eos(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style: pad id == EOS id
    formatter = SampleFormatter(tokenizer)
    short = prepared(tokenizer, formatter, "a cat", [1])
    long = prepared(tokenizer, formatter, "two dogs in the park", [2, 3])
    batch = collate_padded([short, long], formatter.pad_id)
    assert batch["labels"][0, len(short) - 1] == tokenizer.eos_token_id  # EOS is a target
    assert (batch["labels"][0, len(short) :] == IGNORE).all()  # padding is not
    assert batch["num_images"].tolist() == [1, 2] and batch["images"].shape[:3] == (2, 2, 1)
    assert "document_ids" not in batch


def test_batcher_packs_only_when_its_pool_is_full_and_flushes_the_rest(tokenizer):
    formatter = SampleFormatter(tokenizer)
    batcher = Batcher(2, formatter.pad_id, PackingConfig(row_tokens=40, max_images_per_row=4, pool_rows=1.0))
    samples = [prepared(tokenizer, formatter, "a cat " * (1 + i % 4), [i]) for i in range(12)]
    batches = []
    for sample in samples:
        batcher.add(sample)
        if batcher.ready():
            batches.append(batcher.pop_batch())
    while (batch := batcher.pop_batch()) is not None:
        batches.append(batch)
    assert sum(int(b["document_ids"].amax(1).sum()) for b in batches) == 12  # every document exactly once
    assert all(b["attention_mask"].sum(1).max() <= 40 for b in batches)


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return build_flamingo(tiny_config(tokenizer_dir), seed=0).eval()


def model_batch(model, documents: list[list[TextItem | ImageItem]]) -> list[PreparedSample]:
    formatter = SampleFormatter(model.tokenizer, FormatConfig(max_tokens=64))
    samples = []
    for items in documents:
        out = formatter.format(items)
        kept = [i for i in items if isinstance(i, ImageItem)][: out.num_images]
        pixels = [model.vision_encoder.preprocess_image(decode_image(i.data, "x")) for i in kept]
        samples.append(PreparedSample(out.input_ids, out.labels, pixels))
    return samples


DOCUMENTS = [
    [image(1), TextItem("a red cat sits")],
    [TextItem("intro"), image(2), TextItem("a dog"), image(3), TextItem("the sky")],
]


def test_padded_batches_train_the_model(model):
    samples = model_batch(model, DOCUMENTS)
    out = model(**collate_padded(samples, model.special_ids.pad))
    assert torch.isfinite(out.loss)


@pytest.mark.skipif(
    "document_ids" not in inspect.signature(Flamingo.forward).parameters,
    reason="the model does not take document_ids yet",
)
def test_each_packed_document_sees_only_its_own_tokens_and_images(model):
    samples = model_batch(model, DOCUMENTS)
    with torch.no_grad():
        packed = model(**collate_packed([samples], model.special_ids.pad)).logits[0]
        start = 0
        for sample in samples:
            alone = model(**collate_padded([sample], model.special_ids.pad)).logits[0]
            torch.testing.assert_close(packed[start : start + len(sample)], alone, atol=1e-5, rtol=1e-4)
            start += len(sample)
