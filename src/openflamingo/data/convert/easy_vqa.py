"""easy-VQA (PyPI `easy-vqa==1.0`, MIT: 64x64 images of one coloured shape, yes/no, shape and colour questions).

Six layouts:
- `pairs`: one caption per image ("a blue rectangle"), read off that image's question-answer pairs;
- `vqa`: one document per question, `<image>Question: q Short answer: a`, only the answer trained;
- `vqa-balanced`: `vqa` with as many "yes" as "no" answers per yes/no question kind (negated or not x the colour or
  shape asked about). easy-VQA mostly asks about what is absent ("is there a red shape?" is mostly "no"), so
  on `vqa` a model scores its yes/no questions from the question alone and never learns to look;
- `fewshot`: documents of `shots` image/question/answer triples on different images, so in-context use is trained
  (a model trained on single questions does worse with demonstrations than without);
- `chat`: conversations of `shots` turns about one image, answered in sentences ("What color is the shape?" ->
  "It is brown."), the fine-tuning demo's data;
- `binding`: fast concept binding (Tsimpoukelli et al. 2021): documents "<image>This is a dax.<|endofchunk|>..." whose
  two nonsense names are drawn anew for each document and bound to two shapes by the document alone, so only a
  model that matches the images in its prompt can predict the later names (only those are trained).
`easy_vqa_shards()` builds cached shards once, for the trainer's first run.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import InputError, MissingDependencyError
from ..samples import Conversation, ImageItem, ImageTextPair, InterleavedDocument, TextItem, Turn
from .annotations import VQA_PROMPT, vqa_items
from .common import ConversionReport, image_file, write_samples

LAYOUTS = ("pairs", "vqa", "vqa-balanced", "fewshot", "chat", "binding")
SHAPES = ("circle", "rectangle", "triangle")
NEGATIONS = ("not", "no")


def _load(split: str):
    try:
        import easy_vqa
    except ImportError:
        raise MissingDependencyError("easy-VQA data needs its package: pip install easy-vqa==1.0") from None
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise InputError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    colours = sorted(set(easy_vqa.get_answers()) - set(SHAPES) - {"yes", "no"})
    return list(zip(questions, answers, image_ids, strict=True)), paths, colours


def caption_from_questions(qas: list[tuple[str, str]], colours: list[str]) -> str:
    """The shape and colour that the image's answers reveal, e.g. "a blue rectangle"."""
    found: dict[str, str] = {}
    for question, answer in qas:
        words = question.rstrip("?").split()
        # A what-question presupposes what it names ("what color is the triangle?"); a yes/no question affirms its
        # shape or colour when the answer and the negation agree ("is there not a red shape?" - "no").
        affirmed = answer not in ("yes", "no") or (answer == "yes") != any(w in NEGATIONS for w in words)
        for word in [*words, answer] if affirmed else []:
            if word in SHAPES:
                found["shape"] = word
            elif word in colours:
                found["colour"] = word
    return " ".join(["a", found.get("colour", ""), found.get("shape", "shape")]).replace("  ", " ")


def nonsense_names(split: str) -> list[str]:
    """Pronounceable non-words (consonant-vowel-consonant-vowel-consonant, "pusab", "narol") for the binding task:
    400 for training documents, 100 held out for evaluation; disjoint and the same on every machine."""
    rng = random.Random("easy-vqa binding names")
    names: dict[str, None] = {}
    while len(names) < 500:
        names["".join(rng.choice("bdfgklmnprstvz" if i % 2 == 0 else "aeiou") for i in range(5))] = None
    ordered = list(names)
    if split == "train":
        return ordered[:400]
    if split == "test":
        return ordered[400:]
    raise InputError(f"binding names: split must be 'train' or 'test', got {split!r}")


def balanced_yes_no(records, colours: list[str], seed: int) -> list[int]:
    """Indices of `records` to keep: every open question, and per yes/no question kind (negated or not x the colour or
    shape asked about) all answers of the rarer kind and a seeded sample of as many of the other."""
    kinds: dict[tuple[bool, str | None], dict[str, list[int]]] = {}
    keep: list[int] = []
    for index, (question, answer, _) in enumerate(records):
        if answer not in ("yes", "no"):
            keep.append(index)
            continue
        words = question.rstrip("?").split()
        subject = next((w for w in words if w in SHAPES or w in colours), None)
        kind = (any(w in NEGATIONS for w in words), subject)
        kinds.setdefault(kind, {"yes": [], "no": []})[answer].append(index)
    rng = random.Random(f"easy-vqa balanced yes/no/{seed}")
    for by_answer in kinds.values():
        count = min(len(indices) for indices in by_answer.values())
        for indices in by_answer.values():
            keep += rng.sample(indices, count)
    return sorted(keep)


BINDING_TEXT = "This is a"


def _captions(records, colours: list[str]) -> dict[int, str]:
    """{image id: its caption read off its answers}, in image id order."""
    per_image: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in records:
        per_image.setdefault(image_id, []).append((question, answer))
    return {image_id: caption_from_questions(per_image[image_id], colours) for image_id in sorted(per_image)}


def _by_shape(captions: dict[int, str]) -> dict[str, list[int]]:
    by_shape: dict[str, list[int]] = {shape: [] for shape in SHAPES}
    for image_id, caption in captions.items():
        shape = caption.split()[-1]
        if shape in by_shape:  # "shape": the answers never name it
            by_shape[shape].append(image_id)
    return by_shape


def images_by_shape(split: str) -> tuple[dict[str, list[int]], list[str]]:
    """{shape: image ids whose questions reveal that shape}, and the image paths."""
    records, paths, colours = _load(split)
    return _by_shape(_captions(records, colours)), paths


def binding_episode(
    rng: random.Random, by_shape: dict[str, list[int]], names: list[str], pairs: int, queries: int
) -> list[tuple[int, str]]:
    """(image id, name) per image: two names bound to two random shapes, shown as `pairs` pairs (one image of each
    shape, in random order), then `queries` images of either shape. Colours are random, so only shape binds."""
    shapes = rng.sample(SHAPES, 2)
    bound = dict(zip(shapes, rng.sample(names, 2), strict=True))
    order = [shape for _ in range(pairs) for shape in rng.sample(shapes, 2)]
    order += [rng.choice(shapes) for _ in range(queries)]
    images: list[int] = []
    for shape in order:
        image_id = rng.choice(by_shape[shape])
        while image_id in images:  # every image of an episode is a different picture
            image_id = rng.choice(by_shape[shape])
        images.append(image_id)
    return [(image_id, bound[shape]) for image_id, shape in zip(images, order, strict=True)]


def _binding_documents(
    image, by_shape: dict[str, list[int]], count: int, split: str, seed: int, pairs: int = 2, queries: int = 2
):
    """`count` documents; names are trained only once the document has bound both."""
    names = nonsense_names(split)
    rng = random.Random(f"binding/{split}/{seed}")
    for index in range(count):
        episode = binding_episode(rng, by_shape, names, pairs, queries)
        items = []
        for position, (image_id, name) in enumerate(episode):
            items += [
                image(image_id),
                TextItem(BINDING_TEXT, loss=False),
                TextItem(f"{name}.", loss=position >= 2),
            ]
        metadata = {"images": [i for i, _ in episode], "names": [n for _, n in episode]}
        yield InterleavedDocument(f"{index:07d}", items, metadata)


def sentence_answer(answer: str) -> str:
    """An easy-VQA answer as the sentence the chat layout trains: "It is brown.", "It is a circle.", "Yes."."""
    if answer in ("yes", "no"):
        return answer.capitalize() + "."
    return f"It is a {answer}." if answer in SHAPES else f"It is {answer}."


def easy_vqa_samples(
    layout: str,
    report: ConversionReport,
    split: str = "train",
    shots: int = 4,
    seed: int = 0,
    prompt: str = VQA_PROMPT,
) -> Iterator:
    if layout not in LAYOUTS:
        raise InputError(f"easy-VQA layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    records, paths, colours = _load(split)
    images: dict[int, ImageItem] = {}

    def image(image_id: int) -> ImageItem:
        if image_id not in images:
            images[image_id] = image_file(Path(paths[image_id]).parent, Path(paths[image_id]).name)
        return images[image_id]

    if layout == "pairs":
        for image_id, caption in _captions(records, colours).items():
            yield ImageTextPair(f"{image_id:06d}", image(image_id), caption, {"image_id": image_id})
        return
    if layout in ("vqa", "vqa-balanced"):
        kept = balanced_yes_no(records, colours, seed) if layout == "vqa-balanced" else range(len(records))
        for index in kept:
            question, answer, image_id = records[index]
            metadata = {"image_id": image_id, "answer": answer}
            yield InterleavedDocument(
                f"{index:07d}", vqa_items(image(image_id), question, answer, prompt), metadata
            )
        return
    if layout == "binding":
        # one document per image of the split
        yield from _binding_documents(image, _by_shape(_captions(records, colours)), len(paths), split, seed)
        return
    if shots < 1:
        raise InputError(f"{layout} samples need shots >= 1, got {shots}")
    if layout == "chat":
        yield from _conversations(records, image, shots, seed)
        return
    # Deterministic shuffle, then consecutive groups of questions on distinct images.
    order = np.random.default_rng(seed).permutation(len(records))
    group: list[int] = []
    documents = 0
    for index in order:
        if any(records[i][2] == records[index][2] for i in group):
            continue  # one question per image within a document (a repeat would be answered by copying)
        group.append(int(index))
        if len(group) == shots:
            items = [
                item
                for i in group
                for item in vqa_items(image(records[i][2]), records[i][0], records[i][1], prompt)
            ]
            yield InterleavedDocument(f"{documents:07d}", items, {"questions": group})
            documents += 1
            group = []


def _conversations(records, image, turns: int, seed: int) -> Iterator[Conversation]:
    """Per image, `turns` of its questions in a seeded order: the first turn shows the image."""
    per_image: dict[int, list[int]] = {}
    for index, (_, _, image_id) in enumerate(records):
        per_image.setdefault(image_id, []).append(index)
    rng = np.random.default_rng(seed)
    for image_id in sorted(per_image):
        chosen = rng.permutation(per_image[image_id])[:turns]
        conversation = []
        for n, index in enumerate(chosen):
            question, answer, _ = records[index]
            conversation += [
                Turn("user", ("<image>" if n == 0 else "") + question),
                Turn("assistant", sentence_answer(answer)),
            ]
        metadata = {"image_id": image_id, "answers": [records[i][1] for i in chosen]}
        yield Conversation(f"{image_id:06d}", conversation, [image(image_id)], metadata)


def easy_vqa_shards(
    directory: str | Path,
    layout: str = "vqa",
    split: str = "train",
    shots: int = 4,
    seed: int = 0,
    samples_per_shard: int = 2000,
) -> list[str]:
    """Shards of easy-VQA under `directory/easy-vqa-{split}-{layout}[-{shots}shot]`, built once and then reused.

    The folder appears only complete (built under a temporary name, then renamed), so an interrupted first run
    never leaves half a data set behind. Returns the shard paths.
    """
    name = f"easy-vqa-{split}-{layout}" + (f"-{shots}shot" if layout == "fewshot" else "")
    name += f"-{shots}turns" if layout == "chat" else ""
    target = Path(directory) / name
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        try:
            report = ConversionReport()
            write_samples(
                easy_vqa_samples(layout, report, split, shots, seed), tmp, report, samples_per_shard
            )
            tmp.chmod(0o755)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise  # another process (a second rank) finished first otherwise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(str(path) for path in target.glob("*.tar"))
