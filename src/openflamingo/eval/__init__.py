"""Few-shot evaluation: the OpenFlamingo suite (COCO, Flickr30K, VQAv2, OK-VQA, TextVQA, VizWiz, ImageNet, Hateful
Memes) plus NLVR2 and easy-VQA, with the official metrics.

    from openflamingo.eval import EvalConfig, DataPaths, prepare, run
    prepared = prepare(EvalConfig("vqav2", DataPaths(...), shots=[0, 4], trials=3))  # checks files first
    results = run(openflamingo.load("ckpt"), prepared)
"""

from .runner import EvalConfig, PreparedRun, prepare, run
from .tasks import TASKS, DataPaths, TaskSpec, get_task

__all__ = ["TASKS", "DataPaths", "EvalConfig", "PreparedRun", "TaskSpec", "get_task", "prepare", "run"]
