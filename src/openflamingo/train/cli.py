"""`openflamingo train [--config recipe.toml] [--section.key value ...]`, also `python -m openflamingo.train`.

Under torchrun every process runs the same command: `torchrun --nproc_per_node 8 -m openflamingo.train --config ...`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..console import run_command, show_logs
from ..errors import InputError


class _TrainParser(argparse.ArgumentParser):
    """Hands `--section.key value` pairs to the config loader (which names bad keys) instead of rejecting them."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + rest
        return namespace, []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="a TOML recipe, e.g. configs/demo.toml (default: built-in defaults)"
    )
    parser.epilog = (
        "Any config key can be overridden as --section.key VALUE, e.g. --train.lr 3e-4 --datasets.pairs.batch_size 16 "
        "--parallel.mode fsdp. Sections: model, datasets.NAME, data, train, precision, parallel, checkpoint, log, evaluate."
    )


def default_recipe() -> Path:
    """configs/demo.toml of the source checkout this package runs from (the README's `openflamingo train`)."""
    path = Path(__file__).resolve().parents[3] / "configs" / "demo.toml"
    if not path.is_file():
        raise InputError(
            f"--config: not given, and the demo recipe {path} is not there; pass --config RECIPE.toml"
        )
    return path


def run(args: argparse.Namespace) -> None:
    from .config import load_config
    from .loop import train

    config = load_config(args.config or default_recipe(), args.overrides)
    if config.evaluate.before and os.environ.get("RANK", "0") == "0":
        from .evaluate import evaluate_before_training

        evaluate_before_training(config.model, config.evaluate, Path(config.train.output_dir))
    result = train(config)
    if os.environ.get("RANK", "0") != "0":
        return
    if result.export_dir is not None:
        print(f"trained {result.step} steps; model saved to {result.export_dir}")
    if config.evaluate.task is not None:
        from .evaluate import evaluate_after_training

        evaluate_after_training(result.model, config.evaluate, Path(config.train.output_dir))


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `train` command to the `openflamingo` CLI's subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="train a model from a TOML recipe (torchrun for several processes)",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.__class__ = (
        _TrainParser  # subparsers construct their own parser class; we only extend parse_known_args
    )
    add_arguments(parser)
    parser.set_defaults(run=run, overrides=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _TrainParser(prog="python -m openflamingo.train", allow_abbrev=False)
    add_arguments(parser)
    args = parser.parse_args(argv)
    show_logs()
    return run_command("train", lambda: run(args))
