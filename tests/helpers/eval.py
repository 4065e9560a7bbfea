"""Evaluation builders: the eval CLI as `openflamingo eval` runs it, and each task's fixture files as flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from openflamingo.eval import cli as eval_cli

F = Path(__file__).parents[1] / "fixtures" / "eval"


def cli(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="openflamingo")
    eval_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    args.run(args)
    return args


VQA_FILES = [
    "--questions", F / "vqa/val_questions.json", "--annotations", F / "vqa/val_annotations.json",
    "--images", F / "vqa/val", "--train-questions", F / "vqa/train_questions.json",
    "--train-annotations", F / "vqa/train_annotations.json", "--train-images", F / "vqa/train2014",
]  # fmt: skip
TASK_FILES = {
    "coco": ["--karpathy-json", F / "coco/dataset_coco.json", "--references", F / "coco/captions_val2014.json",
             "--images", F / "coco/images"],
    "flickr30k": ["--karpathy-json", F / "flickr30k/dataset_flickr30k.json",
                  "--references", F / "flickr30k/captions_test.json", "--images", F / "flickr30k/images"],
    "vqav2": VQA_FILES, "okvqa": VQA_FILES, "textvqa": VQA_FILES, "vizwiz": VQA_FILES,
    "imagenet": ["--images", F / "imagenet", "--class-names", F / "imagenet/class_names.json"],
    "hateful_memes": ["--annotations", F / "hateful_memes/dev_seen.jsonl",
                      "--train-annotations", F / "hateful_memes/train.jsonl", "--images", F / "hateful_memes"],
    "nlvr2": ["--annotations", F / "nlvr2/dev.json", "--train-annotations", F / "nlvr2/train.json",
              "--images", F / "nlvr2/images"],
    "easy_vqa": ["--num-samples", "6"],
    "easy_vqa_binding": ["--num-samples", "4"],
}  # fmt: skip
