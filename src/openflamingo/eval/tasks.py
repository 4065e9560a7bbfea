"""The evaluation tasks: prompt format, decoding, post-processing, metric and the files each one reads.

Prompt formats, decoding and post-processing follow OpenFlamingo's evaluation (Awadalla et al. 2023) so numbers are
comparable; NLVR2 and easy-VQA are not in that suite and use the same conventions. Everything is overridable.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, MissingFileError
from . import datasets
from .datasets import Example
from .imagenet_classes import IMAGENET_CLASSNAMES


@dataclass
class TaskPrompt:
    """`template` is one example; `{answer}` is where a demonstration's answer goes and where the query ends.
    A demonstration is the filled template + "<|endofchunk|>" + `separator`."""

    template: str
    separator: str = ""


@dataclass
class Decoding:
    max_new_tokens: int = 20
    num_beams: int = 3
    length_penalty: float = 0.0
    min_new_tokens: int = 0


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "generate": free-form answers; "rank": rank class names by log-likelihood
    metric: str  # the headline metric (mean/std over trials are reported for it)
    data: str  # which reader: karpathy, vqa, imagefolder, hateful_memes, nlvr2, easy_vqa
    prompt: TaskPrompt
    decoding: Decoding = field(default_factory=Decoding)
    postprocess: str = "none"  # caption | vqa | okvqa | none
    # fixed label set of rank tasks (None: read from the data, or per example from its info["choices"])
    class_names: tuple[str, ...] | None = None
    attached_demos: bool = False  # each example brings its own demonstrations (info["demos"]), in order
    default_split: str = "test"
    description: str = ""


CAPTION = TaskPrompt("<image>Output:{answer}", "\n")
VQA = TaskPrompt("<image>Question:{question} Short answer:{answer}", "\n")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("coco", "generate", "cider", "karpathy", CAPTION, Decoding(20), "caption",
                 description="COCO captions, Karpathy test split, CIDEr"),
        TaskSpec("flickr30k", "generate", "cider", "karpathy", CAPTION, Decoding(20), "caption",
                 description="Flickr30K captions, Karpathy test split, CIDEr"),
        TaskSpec("vqav2", "generate", "vqa_accuracy", "vqa", VQA, Decoding(5), "vqa",
                 description="VQAv2, official VQA accuracy"),
        TaskSpec("okvqa", "generate", "vqa_accuracy", "vqa", VQA, Decoding(5), "okvqa",
                 description="OK-VQA, VQA accuracy on stemmed answers"),
        TaskSpec("textvqa", "generate", "vqa_accuracy", "vqa", VQA, Decoding(10), "vqa",
                 description="TextVQA (VQAv2 format), VQA accuracy"),
        TaskSpec("vizwiz", "generate", "vqa_accuracy", "vqa", VQA, Decoding(5), "vqa",
                 description="VizWiz (VQAv2 format), VQA accuracy"),
        TaskSpec("imagenet", "rank", "top1", "imagefolder", TaskPrompt("<image>Output:{answer}"),
                 default_split="val", description="ImageNet-1k ImageFolder, top-1/top-5 by class-name likelihood"),
        TaskSpec("hateful_memes", "rank", "roc_auc", "hateful_memes",
                 TaskPrompt("<image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}"),
                 class_names=("no", "yes"), description="Hateful Memes, ROC AUC of P(yes)"),
        TaskSpec("nlvr2", "rank", "accuracy", "nlvr2",
                 TaskPrompt("<image>Left image. <image>Right image. Statement: {sentence} True or false? "
                              "Answer:{answer}"),
                 class_names=("true", "false"), default_split="dev", description="NLVR2, two images, accuracy"),
        TaskSpec("easy_vqa", "rank", "accuracy", "easy_vqa", VQA, default_split="test",
                 description="easy-VQA (built in), accuracy over its 13 answers"),
        TaskSpec("easy_vqa_binding", "rank", "accuracy", "easy_vqa_binding",
                 TaskPrompt("<image>This is a {answer}."), default_split="test", attached_demos=True,
                 description="easy-VQA fast binding (built in): which of two held-out nonsense names, bound to "
                             "shapes by the prompt's demonstrations, names the query image; chance is 50%"),
    )
}  # fmt: skip


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


@dataclass
class DataPaths:
    """Files of a task; which ones are needed depends on the task (see `required_paths`)."""

    images: Path | None = (
        None  # images of the evaluated split (ImageNet: the ImageFolder root with train/, val/)
    )
    train_images: Path | None = None  # images of the demonstration split (default: `images`)
    questions: Path | None = None
    annotations: Path | None = None
    train_questions: Path | None = None
    train_annotations: Path | None = None
    karpathy_json: Path | None = None
    references: Path | None = None
    class_names: Path | None = None
    split: str | None = None  # evaluated split (Karpathy: test; ImageNet: val)


# Which DataPaths fields each reader needs: (to score predictions, additionally to run with demonstrations).
REQUIRED = {
    "karpathy": (("references",), ("karpathy_json", "images")),  # scoring without a split: the predicted ids
    "vqa": (("questions", "annotations"), ("images", "train_questions", "train_annotations")),
    "imagefolder": (("images",), ()),
    "hateful_memes": (("annotations",), ("images", "train_annotations")),
    "nlvr2": (("annotations",), ("images", "train_annotations")),
    "easy_vqa": ((), ()),
    "easy_vqa_binding": ((), ()),
}
FLAGS = {name: "--" + name.replace("_", "-") for name in (f.name for f in dataclasses.fields(DataPaths))}


def check_paths(spec: TaskSpec, paths: DataPaths, run: bool, demos: bool) -> None:
    scoring, running = REQUIRED[spec.data]
    needed = list(scoring) + (list(running) if run else [])
    if run and not demos:
        needed = [name for name in needed if not name.startswith("train_")]
    missing = [FLAGS[name] for name in needed if getattr(paths, name) is None]
    if missing:
        raise InputError(f"task {spec.name} needs {', '.join(missing)}")


@dataclass
class TaskData:
    eval_examples: list[Example]
    demo_pool: list[Example]
    class_names: list[str] | None


def load_task_data(spec: TaskSpec, paths: DataPaths, run: bool = True, demos: bool = True) -> TaskData:
    """Read the evaluated split (and, when running with demonstrations, the training split) of a task."""
    check_paths(spec, paths, run, demos)
    split = paths.split or spec.default_split
    train_images = paths.train_images or paths.images
    pool: list[Example] = []
    classes = list(spec.class_names) if spec.class_names else None
    if spec.data == "karpathy" and paths.karpathy_json is None:
        # Scoring only (run=False): every image with references; `score_file` keeps the predicted ones.
        references = datasets.read_coco_references(paths.references)
        evaluated = [Example(key, [], {}, captions[0], captions) for key, captions in references.items()]
    elif spec.data == "karpathy":
        evaluated = datasets.read_karpathy(paths.karpathy_json, paths.images, split, spec.name)
        if not evaluated:
            raise InputError(f"{paths.karpathy_json}: no images in split {split!r}")
        datasets.attach_references(
            evaluated, datasets.read_coco_references(paths.references), paths.references
        )
        if run and demos:
            pool = datasets.read_karpathy(paths.karpathy_json, train_images, "train", spec.name)
    elif spec.data == "vqa":
        evaluated = datasets.read_vqa(paths.questions, paths.annotations, paths.images)
        if run and demos:
            pool = datasets.read_vqa(paths.train_questions, paths.train_annotations, train_images)
    elif spec.data == "imagefolder":
        root = Path(paths.images)
        folders = datasets.image_folder_classes(root / split)
        names = imagenet_class_names(folders, paths.class_names)
        classes = [names[folder] for folder in folders]
        evaluated = datasets.read_image_folder(root / split, names)
        if run and demos:
            pool = datasets.read_image_folder(root / "train", names)
    elif spec.data == "hateful_memes":
        evaluated = datasets.read_hateful_memes(paths.annotations, paths.images, need_labels=True)
        if run and demos:
            pool = datasets.read_hateful_memes(paths.train_annotations, train_images, need_labels=True)
    elif spec.data == "nlvr2":
        evaluated = datasets.read_nlvr2(paths.annotations, paths.images)
        if run and demos:
            pool = datasets.read_nlvr2(paths.train_annotations, train_images)
    elif spec.data == "easy_vqa":
        evaluated, classes = datasets.read_easy_vqa(split)
        if run and demos:
            pool, _ = datasets.read_easy_vqa("train")
    elif spec.data == "easy_vqa_binding":
        evaluated = datasets.read_easy_vqa_binding(split)
    else:
        raise InputError(f"task {spec.name}: unknown data kind {spec.data!r}")
    return TaskData(evaluated, pool, classes)


def imagenet_class_names(folders: list[str], class_names_file: Path | None) -> dict[str, str]:
    """Folder -> class name. A JSON object {folder: name} or a text file with one name per line (sorted folder
    order); without one, 1000 folders get ImageNet's names in sorted-synset order (the standard class index, as
    OpenFlamingo does), and other folder sets their own names with "_" read as a space."""
    if class_names_file is not None:
        path = Path(class_names_file)
        if not path.is_file():
            raise MissingFileError(
                f"{path} not found (class names: JSON {{folder: name}} or one name per line)"
            )
        if path.suffix == ".json":
            names = datasets.read_json(path, "a JSON object {folder: class name}")
            if not isinstance(names, dict):
                raise InputError(f"{path}: expected a JSON object {{folder: class name}}")
            return {str(k): str(v) for k, v in names.items()}
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(lines) != len(folders):
            raise InputError(f"{path}: {len(lines)} class names for {len(folders)} class folders")
        return dict(zip(folders, lines, strict=True))
    if len(folders) == len(IMAGENET_CLASSNAMES):
        return dict(zip(folders, IMAGENET_CLASSNAMES, strict=True))
    return {folder: folder.replace("_", " ") for folder in folders}


def describe(spec: TaskSpec) -> dict:
    """The task's settings as recorded in results files."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))
