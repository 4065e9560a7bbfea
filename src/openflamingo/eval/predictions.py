"""Saved prediction files (JSON lines), scored without a model by the same code as live runs.

- VQA tasks: {"question_id": ..., "answer": "..."}  (answers are scored as given: post-process them first)
- captioning: {"image_id": ..., "caption": "..."}  (without a Karpathy file, the predicted image ids are scored)
- rank tasks: {"id": ..., "scores": {class: logprob}} or {"id": ..., "prediction": "class"}
The per-sample files of `openflamingo eval` have these fields too.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .datasets import Example, read_jsonl
from .metrics import Scored, score_task
from .tasks import DataPaths, TaskSpec, load_task_data
from .vqa_metric import DEFAULT_VQA_METRIC

FIELDS = {"vqa_accuracy": ("question_id", "answer"), "cider": ("image_id", "caption")}


def read_predictions(spec: TaskSpec, path: Path) -> dict[str, object]:
    id_field, answer_field = FIELDS.get(spec.metric, ("id", None))
    predictions: dict[str, object] = {}
    for n, row in enumerate(read_jsonl(path, f"{spec.name} predictions"), start=1):
        source = f"{path}:{n}"
        if not isinstance(row, dict) or id_field not in row:
            raise InputError(f"{source}: missing field {id_field!r}")
        key = str(row[id_field])
        if key in predictions:
            raise InputError(f"{source}: {id_field} {row[id_field]!r} predicted twice")
        if answer_field is not None:
            if not isinstance(row.get(answer_field), str):
                raise InputError(f"{source}: field {answer_field!r} must be a string")
            predictions[key] = row[answer_field]
        elif isinstance(row.get("scores"), dict) and row["scores"]:
            predictions[key] = {"scores": {str(k): float(v) for k, v in row["scores"].items()}}
        elif isinstance(row.get("prediction"), str):
            predictions[key] = {"prediction": row["prediction"]}
        else:
            raise InputError(f"{source}: needs 'scores' ({{class: logprob}}) or 'prediction' (a class name)")
    return predictions


def predicted_images(
    examples: list[Example], predictions: dict[str, object], references: Path, predictions_path: Path
) -> list[Example]:
    """Captioning without a Karpathy split: the predicted image ids are the evaluated set, as in COCOEvalCap with
    params["image_id"] = cocoRes.getImgIds() (CIDEr's document frequencies come from these images only)."""
    by_key = {example.key: example for example in examples}
    missing = [key for key in predictions if key not in by_key]
    if missing:
        raise InputError(
            f"{references}: no reference captions for image_id {missing[0]} predicted in {predictions_path} "
            f"({len(missing)} predicted image ids have none)"
        )
    return [by_key[key] for key in predictions]


def score_file(
    spec: TaskSpec, predictions_path: Path, paths: DataPaths, vqa_metric: str = DEFAULT_VQA_METRIC
) -> Scored:
    predictions = read_predictions(spec, predictions_path)
    data = load_task_data(spec, paths, run=False)
    examples = data.eval_examples
    if spec.data == "karpathy" and paths.karpathy_json is None:
        examples = predicted_images(examples, predictions, paths.references, predictions_path)
    if data.class_names is not None:
        known = set(data.class_names)
        for key, prediction in predictions.items():
            names = prediction.get("scores") or {prediction.get("prediction"): 0.0}
            unknown = [name for name in names if name not in known]
            if unknown:
                raise InputError(
                    f"{predictions_path}: id {key!r} names class {unknown[0]!r}, not one of the task's classes"
                )
    return score_task(spec, examples, predictions, vqa_metric)
