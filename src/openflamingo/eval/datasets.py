"""Readers for the official file formats of the evaluation tasks, with errors that name the file and the id.

Every reader returns `Example`s. Image paths are not checked here (scoring saved predictions needs no images);
`resolve_images` checks the examples a run actually uses, before any model time is spent.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, MissingDependencyError, MissingFileError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Example:
    id: Any  # question_id, image_id, meme id, NLVR2 identifier or ImageFolder path: what predictions are keyed by
    images: list[tuple[Path, ...]]  # per image of the prompt, candidate paths (the first that exists is used)
    fields: dict[str, str]  # values for the prompt template ({question}, {text}, {sentence})
    target: str  # the answer a demonstration shows (caption, first human answer, class name)
    references: Any = None  # what a prediction is scored against (captions, answer records, class name)
    info: dict = field(default_factory=dict)  # answer_type and similar breakdown keys

    @property
    def key(self) -> str:
        """Ids as strings: JSON round trips and Flickr's string ids compare equal to the originals."""
        return str(self.id)


def read_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}); expected {what}"
        ) from None


def read_jsonl(path: Path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found ({what})")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not valid JSON ({error.msg}); expected {what}") from None
    return rows


def require(record: dict, key: str, source: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise InputError(f"{source}: missing field {key!r}")
    return record[key]


def resolve_images(examples: list[Example]) -> None:
    """Replace each image's candidates by the one that exists; FileNotFoundError naming the example otherwise."""
    for example in examples:
        for i, candidates in enumerate(example.images):
            found = next((path for path in candidates if path.is_file()), None)
            if found is None:
                tried = ", ".join(str(path) for path in candidates)
                raise MissingFileError(f"image of example {example.id!r} not found (tried {tried})")
            example.images[i] = (found,)


# ----- captioning: Karpathy splits + COCO-format references -------------------------------------------------------
def read_karpathy(path: Path, image_root: Path | None, split: str, dataset: str) -> list[Example]:
    """`dataset_coco.json` / `dataset_flickr30k.json`. COCO ids are `cocoid`; Flickr ids the file name stem."""
    data = read_json(path, f"a Karpathy split file such as dataset_{dataset}.json")
    entries = require(data, "images", str(path))
    root = Path(image_root) if image_root is not None else Path(".")
    examples = []
    for n, entry in enumerate(entries):
        source = f"{path}: images[{n}]"
        if require(entry, "split", source) != split:
            continue
        filename = require(entry, "filename", source)
        image_id = require(entry, "cocoid", source) if dataset == "coco" else Path(filename).stem
        captions = [require(s, "raw", source) for s in require(entry, "sentences", source)]
        if not captions:
            raise InputError(f"{source}: image {image_id!r} has no sentences")
        candidates = (root / entry.get("filepath", "") / filename, root / filename)
        examples.append(Example(image_id, [candidates], {}, captions[0].strip(), captions))
    return examples


def read_coco_references(path: Path) -> dict[str, list[str]]:
    """COCO caption annotations (`captions_val2014.json` or a COCO-style Flickr30K file): image id -> captions."""
    data = read_json(path, "COCO-format caption annotations with an 'annotations' list")
    references: dict[str, list[str]] = {}
    for n, annotation in enumerate(require(data, "annotations", str(path))):
        source = f"{path}: annotations[{n}]"
        references.setdefault(str(require(annotation, "image_id", source)), []).append(
            require(annotation, "caption", source)
        )
    return references


def attach_references(examples: list[Example], references: dict[str, list[str]], path: Path) -> None:
    for example in examples:
        if example.key not in references:
            raise InputError(f"{path}: no reference captions for image_id {example.id!r}")
        example.references = references[example.key]


# ----- VQA family: VQAv2-format questions + annotations ----------------------------------------------------------
def vqa_image_candidates(root: Path, image_id: Any, subtype: str | None) -> tuple[Path, ...]:
    if isinstance(image_id, str):  # VizWiz ("VizWiz_val_00000001.jpg") and TextVQA ("0054c91397f2fe05")
        return (root / image_id, root / f"{image_id}.jpg")
    names = [f"COCO_{subtype}_{image_id:012d}.jpg"] if subtype else []
    names += [f"COCO_{root.name}_{image_id:012d}.jpg", f"{image_id:012d}.jpg", f"{image_id}.jpg"]
    return tuple(root / name for name in dict.fromkeys(names))


def read_vqa(questions_path: Path, annotations_path: Path | None, image_root: Path | None) -> list[Example]:
    """Questions are matched to annotations by question_id; both files must hold the same ids."""
    questions_data = read_json(questions_path, "VQAv2-format questions with a 'questions' list")
    questions = require(questions_data, "questions", str(questions_path))
    annotations: dict[Any, dict] = {}
    if annotations_path is not None:
        data = read_json(annotations_path, "VQAv2-format annotations with an 'annotations' list")
        for n, annotation in enumerate(require(data, "annotations", str(annotations_path))):
            question_id = require(annotation, "question_id", f"{annotations_path}: annotations[{n}]")
            require(annotation, "answers", f"{annotations_path}: annotations[{n}]")
            if question_id in annotations:
                raise InputError(f"{annotations_path}: question_id {question_id!r} is annotated twice")
            annotations[question_id] = annotation
    subtype = questions_data.get("data_subtype")
    root = Path(image_root) if image_root is not None else Path(".")
    examples, seen = [], set()
    for n, question in enumerate(questions):
        source = f"{questions_path}: questions[{n}]"
        question_id = require(question, "question_id", source)
        if question_id in seen:
            raise InputError(f"{questions_path}: question_id {question_id!r} appears twice")
        seen.add(question_id)
        annotation = annotations.get(question_id)
        if annotations_path is not None and annotation is None:
            raise InputError(
                f"{questions_path} and {annotations_path} do not match: question_id {question_id!r} has no annotation"
            )
        answers = annotation["answers"] if annotation else []
        if annotation is not None and not answers:
            raise InputError(f"{annotations_path}: question_id {question_id!r} has no answers")
        examples.append(
            Example(
                id=question_id,
                images=[vqa_image_candidates(root, require(question, "image_id", source), subtype)],
                fields={"question": require(question, "question", source)},
                target=answers[0]["answer"] if answers else "",
                references=answers,
                info={"answer_type": annotation.get("answer_type", "other")} if annotation else {},
            )
        )
    extra = sorted(set(annotations) - seen, key=str)
    if extra:
        raise InputError(
            f"{questions_path} and {annotations_path} do not match: question_id {extra[0]!r} is annotated but not "
            f"asked ({len(extra)} such id(s))"
        )
    return examples


# ----- classification: ImageFolder, Hateful Memes jsonl, NLVR2 json lines ----------------------------------------
def image_folder_classes(root: Path) -> list[str]:
    if not Path(root).is_dir():
        raise MissingFileError(f"{root} not found (an ImageFolder split: one sub-folder of images per class)")
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{root}: no class folders (expected ImageFolder layout: {root}/<class>/<image>)")
    return classes


def read_image_folder(root: Path, class_names: dict[str, str]) -> list[Example]:
    """`root/<class folder>/<image>`; ids are paths relative to root's parent ("val/n01440764/x.JPEG")."""
    root = Path(root)
    examples = []
    for folder in image_folder_classes(root):
        if folder not in class_names:
            raise InputError(f"{root / folder}: class folder has no class name (see --class-names)")
        for path in sorted((root / folder).iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                name = class_names[folder]
                examples.append(Example(f"{root.name}/{folder}/{path.name}", [(path,)], {}, name, name))
    if not examples:
        raise InputError(f"{root}: no images found under its class folders")
    return examples


def read_hateful_memes(path: Path, image_root: Path | None, need_labels: bool) -> list[Example]:
    """Hateful Memes `train.jsonl` / `dev_seen.jsonl` lines: {"id", "img": "img/01235.png", "label", "text"}."""
    root = Path(image_root) if image_root is not None else Path(".")
    examples = []
    for n, row in enumerate(read_jsonl(path, "Hateful Memes json lines"), start=1):
        source = f"{path}:{n}"
        image = require(row, "img", source)
        label = row.get("label")
        if need_labels and label not in (0, 1):
            raise InputError(f"{source}: label must be 0 or 1, got {label!r}")
        name = {0: "no", 1: "yes"}.get(label, "")
        candidates = (root / image, root / Path(image).name)
        examples.append(
            Example(
                require(row, "id", source), [candidates], {"text": require(row, "text", source)}, name, name
            )
        )
    return examples


def read_nlvr2(path: Path, image_root: Path | None) -> list[Example]:
    """NLVR2 `dev.json` lines: {"identifier": "dev-850-0-0", "sentence", "label": "True"/"False", ...}; the images
    are `<identifier without its last part>-img0.png` / `-img1.png` (train images sit in numbered sub-folders)."""
    root = Path(image_root) if image_root is not None else Path(".")
    examples = []
    for n, row in enumerate(read_jsonl(path, "NLVR2 json lines"), start=1):
        source = f"{path}:{n}"
        identifier = require(row, "identifier", source)
        label = str(require(row, "label", source)).lower()
        if label not in ("true", "false"):
            raise InputError(f"{source}: label must be True or False, got {row['label']!r}")
        stem = identifier.rsplit("-", 1)[0]
        subdir = root / str(row["directory"]) if "directory" in row else root
        images = [(root / f"{stem}-img{i}.png", subdir / f"{stem}-img{i}.png") for i in (0, 1)]
        examples.append(
            Example(identifier, images, {"sentence": require(row, "sentence", source)}, label, label)
        )
    return examples


# ----- easy-VQA: built in, from the PyPI package easy-vqa --------------------------------------------------------
EASY_VQA_SHAPES = {"circle", "rectangle", "triangle"}


def read_easy_vqa(split: str) -> tuple[list[Example], list[str]]:
    try:
        import easy_vqa
    except ImportError:
        raise MissingDependencyError(
            "task easy_vqa needs the easy-VQA data: pip install easy-vqa==1.0"
        ) from None
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    examples = []
    for n, (text, answer, image_id) in enumerate(zip(texts, answers, image_ids, strict=True)):
        kind = "yes/no" if answer in ("yes", "no") else "shape" if answer in EASY_VQA_SHAPES else "color"
        examples.append(
            Example(n, [(Path(paths[image_id]),)], {"question": text}, answer, answer, {"answer_type": kind})
        )
    return examples, list(easy_vqa.get_answers())


def read_easy_vqa_binding(split: str) -> list[Example]:
    """easy_vqa_binding: one example per image of the split, each with its own prompt: two held-out nonsense names
    bound to two shapes by four demonstrations (one image of each shape, then another of each, in random order),
    a query image of one of the two shapes, and the two names as its choices. The same on every run."""
    from ..data.convert.easy_vqa import binding_episode, images_by_shape, nonsense_names

    by_shape, paths = images_by_shape(split)
    names = nonsense_names("test")  # never seen in training, whatever the evaluated split
    rng = random.Random(f"binding eval/{split}")
    examples = []
    for n in range(len(paths)):
        *demos, (image_id, name) = binding_episode(rng, by_shape, names, pairs=2, queries=1)
        examples.append(
            Example(
                n,
                [(Path(paths[image_id]),)],
                {},
                name,
                name,
                {
                    "demos": [
                        Example(f"{n}/{k}", [(Path(paths[i]),)], {}, d) for k, (i, d) in enumerate(demos)
                    ],
                    "choices": sorted({d for _, d in demos}),
                },
            )
        )
    return examples
