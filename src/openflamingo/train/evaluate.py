"""Evaluate the trained model after training (`[evaluate]`): with its images, blind, and at each shot count."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .config import EvaluateConfig


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


def evaluate_after_training(model, config: EvaluateConfig, output_dir: Path) -> dict[str, dict[str, float]]:
    """{"trained": {"0-shot": acc, ...}, "blind": {...}}; writes output_dir/eval/summary.json and prints it."""
    from ..eval import DataPaths, EvalConfig, prepare, run

    summary: dict[str, dict[str, float]] = {}
    for variant in ("trained", "blind") if config.blind else ("trained",):
        eval_config = EvalConfig(
            config.task,
            DataPaths(),
            shots=list(config.shots),
            trials=1,
            num_samples=config.num_samples,
            batch_size=config.batch_size,
            zero_shot=config.zero_shot,
            prompt=config.prompt,
            separator=config.separator,
            output_dir=output_dir / "eval" / variant,
        )
        with cross_attention_off(model) if variant == "blind" else nullcontext():
            document = run(model, prepare(eval_config))
        summary[variant] = {f"{entry['shots']}-shot": entry["mean"] for entry in document["results"].values()}
    (output_dir / "eval").mkdir(parents=True, exist_ok=True)
    (output_dir / "eval" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{config.task} after training: " + json.dumps(summary))
    return summary
