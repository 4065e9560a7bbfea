"""Evaluate the trained model after training (`[evaluate]`): with its images, blind, and at each shot count.

Task `easy_vqa_chat` (the fine-tuning demo) answers held-out easy-VQA conversations instead; with `before = true`
the starting weights are scored the same way first, so the summary shows before and after.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..errors import InputError
from .config import CHAT_TASK, EvaluateConfig, ExtraEvaluation


@contextmanager
def cross_attention_off(model) -> Iterator[None]:
    """Gates at 0 make every gated block the identity: the frozen LM (with the trained special tokens) alone."""
    gates = [block.attn_gate for block in model.cross_attn_blocks.values()]
    gates += [block.ff_gate for block in model.cross_attn_blocks.values()]
    saved = [gate.detach().clone() for gate in gates]
    with torch.no_grad():
        for gate in gates:
            gate.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for gate, value in zip(gates, saved, strict=True):
                gate.copy_(value)


CHAT_TURNS = 3  # questions per held-out conversation


def chat_scores(model, config: EvaluateConfig) -> dict[str, float]:
    from ..data.convert import ConversionReport
    from ..data.convert.easy_vqa import easy_vqa_samples
    from ..eval.conversations import evaluate_conversations

    samples = easy_vqa_samples("chat", ConversionReport(), "test", shots=CHAT_TURNS, seed=0)
    conversations = list(itertools.islice(samples, config.num_samples))
    answers = {a for c in conversations for a in c.metadata["answers"]}
    return evaluate_conversations(model.eval(), conversations, answers, batch_size=config.batch_size)


def evaluate_before_training(model_config, config: EvaluateConfig, output_dir: Path) -> dict[str, float]:
    """The starting weights' scores, computed once per run (a resumed run reuses them)."""
    from ..model.checkpoint import build_or_load

    path = output_dir / "eval" / "before.json"
    if path.is_file():
        return json.loads(path.read_text())
    if config.task != CHAT_TASK:
        raise InputError(f"evaluate.before: only task {CHAT_TASK!r} scores the starting weights")
    scores = chat_scores(build_or_load(model_config), config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores, indent=2) + "\n")
    print(f"{config.task} before training: " + json.dumps(scores))
    return scores


def evaluate_after_training(model, config: EvaluateConfig, output_dir: Path) -> dict:
    """Scores of `config.task` and `config.extra_tasks`, with the images ("trained") and without ("blind"):
    {variant: {task: {"N-shot": {"accuracy": .., per answer type: ..}}}}; writes output_dir/eval/summary.json and
    prints it as one table."""
    from ..eval import DataPaths, EvalConfig, prepare, run

    summary: dict = {}
    if config.task == CHAT_TASK:
        before = output_dir / "eval" / "before.json"
        if before.is_file():
            summary["before"] = json.loads(before.read_text())
        summary["trained"] = chat_scores(model, config)
        return _write_summary(summary, config, output_dir)
    tasks = {config.task: ExtraEvaluation(list(config.shots), config.num_samples), **config.extra_tasks}
    for variant in ("trained", "blind") if config.blind else ("trained",):
        summary[variant] = {}
        for task, settings in tasks.items():
            shots = settings.shots
            if variant == "blind" and config.blind_shots is not None:
                shots = [s for s in shots if s in config.blind_shots]
            if not shots:
                continue
            main = task == config.task  # the recipe's prompt is for its main task; the others keep theirs
            eval_config = EvalConfig(
                task,
                DataPaths(),
                shots=shots,
                trials=1,
                num_samples=settings.num_samples or config.num_samples,
                batch_size=config.batch_size,
                zero_shot=config.zero_shot,
                prompt=config.prompt if main else None,
                separator=config.separator if main else None,
                output_dir=output_dir / "eval" / variant,
            )
            with cross_attention_off(model) if variant == "blind" else nullcontext():
                document = run(model, prepare(eval_config))
            summary[variant][task] = {
                f"{entry['shots']}-shot": _scores(entry) for entry in document["results"].values()
            }
    return _write_summary(summary, config, output_dir)


def _scores(entry: dict) -> dict[str, float]:
    """The headline metric, then the breakdown (easy-VQA's answer types), of one shot count's single trial."""
    metrics = entry["metrics_per_trial"][0]
    breakdown = {k.split("_", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{entry['metric']}_")}
    return {entry["metric"]: entry["mean"], **breakdown}


def summary_table(summary: dict) -> str:
    """The scores as one Markdown table: a row per task, shot count and answer type; a column per variant."""
    variants = [v for v in ("trained", "blind") if v in summary]
    header = ["task", "shots", "answers", *variants]
    rows = []
    for task, per_shots in summary[variants[0]].items():
        for shots, scores in per_shots.items():
            for name in scores:
                values = [summary[v].get(task, {}).get(shots, {}).get(name) for v in variants]
                cells = ["-" if value is None else f"{value:.1f}" for value in values]
                rows.append(
                    [task, shots.removesuffix("-shot"), "all" if name == "accuracy" else name, *cells]
                )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _write_summary(summary: dict, config: EvaluateConfig, output_dir: Path) -> dict:
    (output_dir / "eval").mkdir(parents=True, exist_ok=True)
    (output_dir / "eval" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if config.task == CHAT_TASK:
        print(f"{config.task} after training: " + json.dumps(summary))
    else:
        print(f"after training ({output_dir / 'eval' / 'summary.json'}):\n{summary_table(summary)}")
    return summary
