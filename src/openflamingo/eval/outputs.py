"""What an evaluation writes: a results JSON, per-sample JSON lines, and a short table.

Shapes follow lmms-eval's outputs (results keyed "metric,none", "n-shot", "n-samples", "configs", "versions",
"config", "date"), one entry per task and shot count ("vqav2_4shot"), plus what few-shot evaluation needs: mean
and std over trials, per-trial values and seeds. Sample lines carry lmms-eval's doc_id/target/resps/filtered_resps
and, under the task's own prediction-file names, the prediction, so `openflamingo eval score` reads them back.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import platform
from pathlib import Path


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("openflamingo", "torch", "transformers", "pycocoevalcap", "easy-vqa", "nltk", "inflection"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def entry_name(task: str, shots: int) -> str:
    return f"{task}_{shots}shot"


def results_document(
    task: str, metric: str, per_shots: list[dict], task_config: dict, run_config: dict
) -> dict:
    results, n_shot, higher, n_samples = {}, {}, {}, {}
    for entry in per_shots:
        name = entry_name(task, entry["shots"])
        results[name] = {
            "alias": name,
            f"{metric},none": entry["mean"],
            f"{metric}_std,none": entry["std"],
            **entry,
        }
        n_shot[name] = entry["shots"]
        higher[name] = {metric: True}
        n_samples[name] = {"original": entry["num_examples"], "effective": entry["num_evaluated"]}
    return {
        "results": results,
        "n-shot": n_shot,
        "higher_is_better": higher,
        "n-samples": n_samples,
        "configs": {task: task_config},
        "config": run_config,
        "versions": package_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def clean(value):
    """JSON without NaN (written as null), paths as strings."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, document: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(document), indent=2) + "\n")
    tmp.replace(path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(clean(record)) + "\n")
    tmp.replace(path)


def samples_path(output_dir: Path, task: str, shots: int, trial: int) -> Path:
    return Path(output_dir) / f"samples_{entry_name(task, shots)}_trial{trial}.jsonl"


def format_table(task: str, metric: str, per_shots: list[dict]) -> str:
    rows = [("task", "shots", "metric", "mean", "std", "trials", "n")]
    for entry in per_shots:
        trials = " ".join(fmt(v) for v in entry["trials"])
        rows.append(
            (
                task,
                str(entry["shots"]),
                metric,
                fmt(entry["mean"]),
                fmt(entry["std"]),
                trials,
                str(entry["num_evaluated"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fmt(value) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
