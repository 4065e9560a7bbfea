"""easy-VQA fast binding (issue 13): the training documents and the evaluation prompts."""

from __future__ import annotations

import itertools
from collections import Counter

from openflamingo.data import ImageItem, TextItem
from openflamingo.data.convert import ConversionReport
from openflamingo.data.convert.easy_vqa import SHAPES, easy_vqa_samples, images_by_shape, nonsense_names
from openflamingo.eval.datasets import read_easy_vqa_binding


def shape_of(split: str) -> dict[int, str]:
    by_shape, _ = images_by_shape(split)
    return {image_id: shape for shape, ids in by_shape.items() for image_id in ids}


def test_held_out_names_are_disjoint_from_training_names_and_fixed():
    train, test = nonsense_names("train"), nonsense_names("test")
    assert len(set(train)) == 400 and len(set(test)) == 100 and not set(train) & set(test)
    assert nonsense_names("train") == train  # the same on every call (and machine: no global RNG)
    assert all(len(name) == 5 and name.isalpha() for name in train + test)


def test_training_documents_draw_their_names_anew_and_bind_them_to_shapes_by_the_document_alone():
    shapes = shape_of("train")
    documents = list(itertools.islice(easy_vqa_samples("binding", ConversionReport(), "train"), 200))
    pairs = Counter(frozenset(doc.metadata["names"]) for doc in documents)
    assert (
        max(pairs.values()) <= 2
    )  # a name pair (almost) never comes back: names carry no meaning across documents
    used = {name for doc in documents for name in doc.metadata["names"]}
    assert used <= set(nonsense_names("train")) and len(used) > 250
    meanings: dict[str, set[str]] = {}
    for doc in documents:
        images, names = doc.metadata["images"], doc.metadata["names"]
        assert len(images) == 6 == len(set(images)) == len(doc.images)
        bound = {}
        for image_id, name in zip(images, names, strict=True):
            assert bound.setdefault(name, shapes[image_id]) == shapes[image_id]  # one shape per name
            meanings.setdefault(name, set()).add(shapes[image_id])
        assert len(bound) == 2 and len(set(bound.values())) == 2
        assert set(names[:2]) == set(bound)  # both names are shown before any is asked for
        texts = [item for item in doc.items if isinstance(item, TextItem)]
        assert [t.text for t in texts[::2]] == ["This is a"] * 6 and not any(t.loss for t in texts[::2])
        assert [t.text for t in texts[1::2]] == [f"{n}." for n in names]
        assert [t.loss for t in texts[1::2]] == [False, False, True, True, True, True]
        assert isinstance(doc.items[0], ImageItem)
    assert sum(len(m) > 1 for m in meanings.values()) > 20  # the same name means different shapes elsewhere


def test_evaluation_prompts_use_held_out_names_and_two_demonstrations_per_name():
    shapes = shape_of("test")
    examples = read_easy_vqa_binding("test")
    assert (
        len(examples) == 1000
        and read_easy_vqa_binding("test")[7].info["choices"] == examples[7].info["choices"]
    )
    held_out = set(nonsense_names("test"))
    answers = Counter()
    for example in examples:
        demos, choices = example.info["demos"], example.info["choices"]
        assert len(demos) == 4 and set(choices) <= held_out and len(choices) == 2
        assert {d.target for d in demos[:2]} == set(choices) == {d.target for d in demos[2:]}
        demo_shapes = {d.target: shapes[int(d.images[0][0].stem)] for d in demos}
        query_shape = shapes[int(example.images[0][0].stem)]
        assert demo_shapes[example.target] == query_shape and len(set(demo_shapes.values())) == 2
        paths = [d.images[0][0] for d in demos] + [example.images[0][0]]
        assert len(set(paths)) == 5  # the query image is never one of its demonstrations
        answers[demos[0].target == example.target] += 1
        assert query_shape in SHAPES
    assert 400 < answers[True] < 600  # the 1-shot demonstration names the query's shape about half the time
