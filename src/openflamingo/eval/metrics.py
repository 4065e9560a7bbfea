"""Scoring predictions: one function per metric, and `score_task` that live runs and `eval score` share.

All headline numbers are percentages (0-100), as the OpenFlamingo and Flamingo papers report them: CIDEr x 100,
VQA accuracy x 100, top-k accuracy, ROC AUC x 100.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import InputError, MissingDependencyError, MissingFileError
from .datasets import Example
from .tasks import TaskSpec
from .vqa_metric import DEFAULT_VQA_METRIC, vqa_accuracy

JAVA_HINT = (
    "CIDEr needs Java: pycocoevalcap's PTB tokenizer runs Stanford CoreNLP (a jar it ships) with `java`; install "
    "a Java runtime (e.g. apt-get install default-jre-headless) and put `java` on PATH"
)


def check_cider_available() -> None:
    """Called before any model time is spent on a captioning task."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise MissingDependencyError("CIDEr needs pycocoevalcap: pip install pycocoevalcap==1.2") from None
    if shutil.which("java") is None:
        raise MissingFileError(JAVA_HINT)


def cider(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[float, dict[str, float]]:
    """CIDEr-D x 100 exactly as pycocoevalcap's COCOEvalCap computes it (PTB tokenization, then Cider), and the
    per-image scores. The document frequencies come from the references of the scored images only."""
    check_cider_available()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = list(predictions)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    score, per_image = Cider().compute_score(gts, res)
    return 100.0 * float(score), {k: 100.0 * float(s) for k, s in zip(keys, per_image, strict=True)}


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half), as sklearn's roc_auc_score."""
    positives = sum(1 for y in labels if y == 1)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan  # undefined with one class only (e.g. a tiny --num-samples subset)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    positive_rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y == 1)
    return (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def softmax(scores: Mapping[str, float]) -> dict[str, float]:
    top = max(scores.values())
    exps = {name: math.exp(value - top) for name, value in scores.items()}
    total = sum(exps.values())
    return {name: value / total for name, value in exps.items()}


def ranked(prediction) -> list[str]:
    """Class names best first; a prediction is either {"scores": {class: logprob}} or {"prediction": class}."""
    if prediction.get("scores") is not None:
        scores = prediction["scores"]
        return sorted(scores, key=lambda name: -scores[name])  # stable: ties keep the class order
    return [prediction["prediction"]]


@dataclass
class Scored:
    metrics: dict[str, float]  # the headline metric first, then others (counts, breakdowns)
    per_example: dict[str, float]  # example key -> that example's score


def score_task(
    spec: TaskSpec,
    examples: Sequence[Example],
    predictions: Mapping[str, object],
    vqa_metric: str = DEFAULT_VQA_METRIC,
) -> Scored:
    """Score `predictions` (example key -> answer/caption text, or a classification dict) against `examples`.
    `vqa_metric` picks the version of VQA accuracy (see `vqa_metric.py`); other tasks ignore it.

    Predictions for ids the data does not hold are errors; examples without a prediction are not scored (runs
    with --num-samples score a subset), and the metrics say how many were.
    """
    by_key = {example.key: example for example in examples}
    unknown = [key for key in predictions if key not in by_key]
    if unknown:
        raise InputError(
            f"prediction for id {unknown[0]!r}, which the {spec.name} data does not hold ({len(unknown)} such)"
        )
    if not predictions:
        raise InputError(f"no predictions to score for {spec.name}")
    scored = [by_key[key] for key in predictions]
    counts = {"num_scored": len(scored), "num_examples": len(examples)}

    if spec.metric == "cider":
        value, per_example = cider(
            {k: str(v) for k, v in predictions.items()}, {e.key: e.references for e in scored}
        )
        return Scored({"cider": value, **counts}, per_example)

    if spec.metric == "vqa_accuracy":
        per_example = {
            e.key: 100.0 * vqa_accuracy(str(predictions[e.key]), e.references, vqa_metric) for e in scored
        }
        return Scored(
            {"vqa_accuracy": mean(per_example.values()), **breakdown(scored, per_example), **counts},
            per_example,
        )

    rankings = {key: ranked(prediction) for key, prediction in predictions.items()}
    correct = {e.key: 100.0 * (rankings[e.key][0] == e.references) for e in scored}
    metrics: dict[str, float] = {}
    if spec.metric == "top1":
        metrics["top1"] = mean(correct.values())
        if all(predictions[e.key].get("scores") is not None for e in scored):
            metrics["top5"] = mean(100.0 * (e.references in rankings[e.key][:5]) for e in scored)
    elif spec.metric == "roc_auc":
        positive = spec.class_names[1]  # hateful memes: P("yes") is the score of the positive class
        probabilities = [positive_probability(predictions[e.key], positive) for e in scored]
        labels = [int(e.references == positive) for e in scored]
        metrics["roc_auc"] = 100.0 * roc_auc(labels, probabilities)
        metrics["accuracy"] = mean(correct.values())
    elif spec.metric == "accuracy":
        metrics["accuracy"] = mean(correct.values())
        metrics.update(breakdown(scored, correct))
    else:
        raise InputError(f"task {spec.name}: unknown metric {spec.metric!r}")
    return Scored({**metrics, **counts}, correct)


def positive_probability(prediction: Mapping, positive: str) -> float:
    if prediction.get("scores") is not None:
        return softmax(prediction["scores"])[positive]
    return float(prediction["prediction"] == positive)


def breakdown(examples: Sequence[Example], per_example: Mapping[str, float]) -> dict[str, float]:
    """Mean score per answer type (VQA's yes/no, number, other; easy-VQA's yes/no, shape, color)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for example in examples:
        if "answer_type" in example.info:
            groups[example.info["answer_type"]].append(per_example[example.key])
    return {f"accuracy_{name}": mean(values) for name, values in sorted(groups.items())}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
