"""`openflamingo eval ...` (evaluate a checkpoint) and `openflamingo eval score ...` (score saved predictions).

`register(subparsers)` adds the command to the main parser; errors are ValueError/FileNotFoundError/ImportError
with one line naming the file, id or value, raised before a model is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from .tasks import TASKS, DataPaths
from .vqa_metric import DEFAULT_VQA_METRIC, VQA_METRICS


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("task files (which ones a task needs: see docs/eval.md)")
    data.add_argument(
        "--images", type=Path, help="images of the evaluated split (ImageNet: root with train/, val/)"
    )
    data.add_argument(
        "--train-images", type=Path, help="images of the demonstration split (default: --images)"
    )
    data.add_argument("--questions", type=Path, help="VQAv2-format questions json of the evaluated split")
    data.add_argument(
        "--annotations", type=Path, help="VQAv2 annotations / Hateful Memes or NLVR2 json lines"
    )
    data.add_argument("--train-questions", type=Path, help="questions of the demonstration split")
    data.add_argument("--train-annotations", type=Path, help="annotations of the demonstration split")
    data.add_argument(
        "--karpathy-json",
        type=Path,
        help="Karpathy split file (dataset_coco.json, ...); eval score without it scores the predicted image ids",
    )
    data.add_argument(
        "--references", type=Path, help="COCO-format reference captions (captions_val2014.json)"
    )
    data.add_argument("--class-names", type=Path, help="ImageNet: JSON {folder: name} or one name per line")
    data.add_argument(
        "--split", help="evaluated split (Karpathy: test, ImageNet: val folder, easy_vqa: test)"
    )


def add_vqa_metric_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vqa-metric",
        choices=VQA_METRICS,
        default=DEFAULT_VQA_METRIC,
        help="version of VQA accuracy (VQA tasks): official = the official script as it is now, "
        "official-2017 = as released in 2017, openflamingo = OpenFlamingo's port, used in its paper "
        "(see docs/eval.md)",
    )


def data_paths(args: argparse.Namespace) -> DataPaths:
    return DataPaths(
        images=args.images,
        train_images=args.train_images,
        questions=args.questions,
        annotations=args.annotations,
        train_questions=args.train_questions,
        train_annotations=args.train_annotations,
        karpathy_json=args.karpathy_json,
        references=args.references,
        class_names=args.class_names,
        split=args.split,
    )


def run_eval(args: argparse.Namespace) -> None:
    from ..model.checkpoint import load, read_config
    from .runner import EvalConfig, prepare, run

    if args.checkpoint is None or args.task is None:
        raise InputError("eval needs --checkpoint DIR and --task TASK (or: openflamingo eval score ...)")
    config = EvalConfig(
        task=args.task,
        paths=data_paths(args),
        shots=args.shots,
        trials=args.trials,
        trial_seeds=args.trial_seeds,
        num_samples=args.num_samples,
        sample_seed=args.sample_seed,
        query_set_size=args.query_set_size,
        batch_size=args.batch_size,
        demos=args.demos,
        zero_shot=args.zero_shot,
        prompt_ensembles=args.prompt_ensembles,
        rank_rows=args.rank_rows,
        length_normalize=not args.no_length_normalization,
        prompt=args.prompt,
        separator=args.separator,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        vqa_metric=args.vqa_metric,
        rices_cache=args.rices_cache,
        output_dir=args.output_dir,
        checkpoint=args.checkpoint,
        device=args.device,
        progress=not args.no_progress,
    )
    read_config(args.checkpoint)  # a wrong directory fails here, before the data is read
    prepared = prepare(config)  # every file, id and image is checked before the model is loaded
    document = run(load(args.checkpoint), prepared)
    if document is not None and args.output_dir is not None:
        print(f"results: {Path(args.output_dir) / f'results_{args.task}.json'}")


def run_score(args: argparse.Namespace) -> None:
    from .predictions import score_file
    from .tasks import get_task

    spec = get_task(args.task)
    scored = score_file(spec, args.predictions, data_paths(args), args.vqa_metric)
    which = {"vqa_metric": args.vqa_metric} if spec.metric == "vqa_accuracy" else {}
    print(json.dumps({"task": args.task, **which, **scored.metrics}))


def register(subparsers) -> argparse.ArgumentParser:
    tasks = ", ".join(TASKS)
    parser = subparsers.add_parser(
        "eval",
        help="few-shot evaluation of a checkpoint",
        description=f"Few-shot evaluation. Tasks: {tasks}.",
    )
    parser.add_argument("--checkpoint", type=Path, help="directory written by save_pretrained")
    parser.add_argument("--task", choices=list(TASKS))
    parser.add_argument("--shots", type=int, nargs="+", default=[0], help="e.g. 0 4 8 16 32")
    parser.add_argument(
        "--trials", type=int, default=3, help="repetitions with different random demonstrations"
    )
    parser.add_argument("--trial-seeds", type=int, nargs="+", help="one per trial (default 42, 43, ...)")
    parser.add_argument("--num-samples", type=int, help="evaluate a random subset of this many examples")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the --num-samples subset")
    parser.add_argument(
        "--query-set-size", type=int, default=2048, help="training examples to draw demos from"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--demos", choices=("random", "rices"), default="random")
    parser.add_argument("--rices-cache", type=Path, help="file for cached RICES features of the demo pool")
    parser.add_argument(
        "--zero-shot",
        choices=("text-demos", "none"),
        default="text-demos",
        help="0 shots: two text-only demonstrations (Flamingo) or none",
    )
    parser.add_argument("--prompt-ensembles", type=int, default=1, help="rank tasks: demo orders to average")
    parser.add_argument(
        "--rank-rows", type=int, default=64, help="rank tasks: prompt x class rows per forward"
    )
    parser.add_argument(
        "--no-length-normalization", action="store_true", help="rank tasks: sum token log-probs"
    )
    parser.add_argument(
        "--prompt", help="prompt template, e.g. '<image>Question:{question} Short answer:{answer}'"
    )
    parser.add_argument("--separator", help="text after each demonstration's <|endofchunk|>")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--length-penalty", type=float)
    parser.add_argument(
        "--output-dir", type=Path, help="results_<task>.json and per-sample JSON lines go here"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_vqa_metric_argument(parser)
    add_data_arguments(parser)
    parser.set_defaults(run=run_eval)

    commands = parser.add_subparsers(dest="eval_command")
    score = commands.add_parser("score", help="score saved predictions (JSON lines) without a model")
    score.add_argument("--task", required=True, choices=list(TASKS))
    score.add_argument("--predictions", type=Path, required=True, help="JSON lines (see docs/eval.md)")
    add_vqa_metric_argument(score)
    add_data_arguments(score)
    score.set_defaults(run=run_score)
    return parser
