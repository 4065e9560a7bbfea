"""Few-shot evaluation runs: `prepare` reads and checks everything (no model needed), `run` evaluates a model.

For each shot count and trial: every evaluated example gets its demonstrations (random from the trial's query set,
or RICES), prompts are batched, answers generated or class names ranked, and the predictions gathered and scored.
The evaluated subset (`num_samples`) is drawn once with `sample_seed`, so shot counts and trials see the same
examples; trials differ in their demonstrations only. Runs without randomness (true zero-shot, RICES) get one trial.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from itertools import islice, permutations
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import InputError
from . import inference, outputs
from .datasets import Example, resolve_images
from .demos import AttachedDemos, RandomDemos, RicesDemos, demo_pool_error
from .distributed import Ranks, gather, init_ranks, shard
from .metrics import check_cider_available, score_task
from .prompts import (
    answer_follows_space,
    build_prompt,
    dialogue_format,
    num_demos,
    postprocessor,
    until_stop,
)
from .tasks import DataPaths, TaskData, TaskPrompt, TaskSpec, describe, get_task, load_task_data
from .vqa_metric import DEFAULT_VQA_METRIC, check_vqa_metric

DEFAULT_FIRST_SEED = 42  # OpenFlamingo's default trial seed; further trials use 43, 44, ...
MAX_STORED_SCORES = 20  # sample lines keep all class scores up to this many classes, else the top 5


@dataclass
class EvalConfig:
    task: str
    paths: DataPaths = field(default_factory=DataPaths)
    shots: list[int] = field(default_factory=lambda: [0])
    trials: int = 3
    trial_seeds: list[int] | None = None
    num_samples: int | None = None  # evaluate a random subset of this many examples (None: all)
    sample_seed: int = 0
    query_set_size: int = 2048  # random demonstrations come from this many training examples per trial
    batch_size: int = 8
    demos: str = "random"  # random | rices
    zero_shot: str = "text-demos"  # text-demos (Flamingo: 2 demonstrations without images) | none
    prompt_ensembles: int = 1  # rank tasks: average over this many demonstration orders (OpenFlamingo: 6)
    rank_rows: int = 64  # rank tasks: prompt x class-name rows per continuation forward pass
    length_normalize: bool = True  # rank tasks: mean (not sum) of the class-name token log-probs
    prompt: str | None = None  # overrides the task's prompt template
    separator: str | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    vqa_metric: str = DEFAULT_VQA_METRIC  # VQA tasks: official | official-2017 | openflamingo (vqa_metric.py)
    rices_cache: Path | None = None  # file for the demonstration pool's RICES features
    output_dir: Path | None = None
    checkpoint: Path | None = None  # recorded in the results
    device: str | None = None
    progress: bool = True

    def seeds(self) -> list[int]:
        return (
            list(self.trial_seeds)
            if self.trial_seeds
            else [DEFAULT_FIRST_SEED + t for t in range(self.trials)]
        )


@dataclass
class PreparedRun:
    config: EvalConfig
    spec: TaskSpec
    data: TaskData
    evaluated: list[Example]
    query_sets: dict[int, RandomDemos]  # trial seed -> random demonstrations
    postprocess: object


def effective_spec(config: EvalConfig) -> TaskSpec:
    spec = get_task(config.task)
    prompt = TaskPrompt(
        config.prompt if config.prompt is not None else spec.prompt.template,
        config.separator if config.separator is not None else spec.prompt.separator,
    )
    given = {k: getattr(config, k) for k in ("max_new_tokens", "num_beams", "length_penalty")}
    decoding = dataclasses.replace(spec.decoding, **{k: v for k, v in given.items() if v is not None})
    return dataclasses.replace(spec, prompt=prompt, decoding=decoding)


def check_config(config: EvalConfig) -> None:
    if not config.shots or any(s < 0 for s in config.shots):
        raise InputError(f"shots must be non-negative integers, got {config.shots}")
    if config.trials < 1 or (config.trial_seeds and len(config.trial_seeds) != config.trials):
        raise InputError(f"trials={config.trials} needs as many trial seeds, got {config.trial_seeds}")
    for name in ("batch_size", "query_set_size", "prompt_ensembles", "rank_rows"):
        if getattr(config, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.demos not in ("random", "rices"):
        raise InputError(f"demos must be 'random' or 'rices', got {config.demos!r}")
    num_demos(0, config.zero_shot)  # validates zero_shot
    check_vqa_metric(config.vqa_metric)


def prepare(config: EvalConfig) -> PreparedRun:
    """Read the task's files and check everything a run needs (files, ids, images, demonstration counts, tools),
    so that bad input fails before a model is loaded."""
    check_config(config)
    spec = effective_spec(config)
    needed = max(num_demos(s, config.zero_shot) for s in config.shots)
    data = load_task_data(spec, config.paths, run=True, demos=needed > 0)
    evaluated = data.eval_examples
    if config.num_samples is not None:
        if not 0 < config.num_samples <= len(evaluated):
            raise InputError(
                f"num_samples={config.num_samples}, but the evaluated split has {len(evaluated)} examples"
            )
        chosen = random.Random(config.sample_seed).sample(range(len(evaluated)), config.num_samples)
        evaluated = [evaluated[i] for i in sorted(chosen)]
    if spec.metric == "cider":
        check_cider_available()
    postprocess = postprocessor(spec.postprocess) if spec.kind == "generate" else None
    query_sets: dict[int, RandomDemos | AttachedDemos] = {}
    if needed > 0 and spec.attached_demos:
        if config.demos != "random":
            raise InputError(
                f"task {spec.name} brings its own demonstrations; --demos {config.demos} does not apply"
            )
        attached = AttachedDemos(evaluated)
        attached.check(needed)
        resolve_images([demo for example in evaluated for demo in example.info["demos"]])
        query_sets = {seed: attached for seed in config.seeds()}
    elif needed > 0 and config.demos == "random":
        for seed in config.seeds():
            query_sets[seed] = RandomDemos(data.demo_pool, config.query_set_size, seed)
            query_sets[seed].check(needed)
            resolve_images(query_sets[seed].query_set)
    elif needed > 0:
        if needed > len(data.demo_pool):
            raise demo_pool_error(needed, len(data.demo_pool), "the demonstration pool")
        resolve_images(data.demo_pool)
    resolve_images(evaluated)
    demo = data.demo_pool[:1] if data.demo_pool else []
    build_prompt(spec.prompt, demo, evaluated[0], shots=1)  # a template that does not fit fails here
    return PreparedRun(config, spec, data, evaluated, query_sets, postprocess)


def run(model, prepared: PreparedRun) -> dict | None:
    """Evaluate `model`; returns the results document on rank 0 (None on other ranks) and writes the outputs."""
    config, spec = prepared.config, prepared.spec
    ranks = init_ranks("nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(config.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    indexed = shard(list(enumerate(prepared.evaluated)), ranks)
    class_ids = None
    if spec.kind == "rank" and prepared.data.class_names is not None:
        class_ids = tokenize_answers(model, spec, prepared.data.class_names)
    rices = None
    if config.demos == "rices" and any(num_demos(s, config.zero_shot) > 0 for s in config.shots):
        progress = tqdm(
            total=len(prepared.data.demo_pool),
            desc="RICES features",
            disable=not (config.progress and ranks.is_main),
        )
        pool = prepared.data.demo_pool
        rices = RicesDemos(
            model, pool, config.batch_size, device, config.rices_cache, progress, ranks.is_main
        )
        progress.close()
        rices.prepare([example for _, example in indexed])

    per_shots = []
    for shots in config.shots:
        count = num_demos(shots, config.zero_shot)
        random_demos = count > 0 and rices is None and not spec.attached_demos
        seeds = config.seeds() if random_demos else config.seeds()[:1]
        values, per_trial = [], []
        for trial, seed in enumerate(seeds):
            selector = rices if rices is not None else prepared.query_sets.get(seed)
            records = run_trial(
                model, prepared, indexed, shots, count, selector, trial, seed, class_ids, device, ranks
            )
            records = gather(records, ranks)
            if ranks.is_main:
                metrics = score_records(spec, prepared.data.eval_examples, records, config.vqa_metric)
                values.append(metrics[spec.metric])
                per_trial.append(metrics)
                if config.output_dir is not None:
                    outputs.write_jsonl(
                        outputs.samples_path(config.output_dir, spec.name, shots, trial), records
                    )
        if ranks.is_main:
            per_shots.append(summarize(shots, count, seeds, values, per_trial, prepared))
    if not ranks.is_main:
        return None
    document = outputs.results_document(
        spec.name, spec.metric, per_shots, task_config(prepared), run_config(model, prepared, ranks)
    )
    if config.output_dir is not None:
        outputs.write_json(Path(config.output_dir) / f"results_{spec.name}.json", document)
    print(outputs.format_table(spec.name, spec.metric, per_shots))
    return document


def run_trial(
    model, prepared, indexed, shots, count, selector, trial, seed, class_ids, device, ranks: Ranks
) -> list[dict]:
    config, spec = prepared.config, prepared.spec
    batches = [indexed[i : i + config.batch_size] for i in range(0, len(indexed), config.batch_size)]
    label = f"{spec.name} {shots}-shot trial {trial}"
    records = []
    for batch in tqdm(batches, desc=label, disable=not (config.progress and ranks.is_main)):
        demos = [selector.select(example, count) if count else [] for _, example in batch]
        dialogue = dialogue_format(model)
        prompts = [
            build_prompt(spec.prompt, d, e, shots, dialogue) for d, (_, e) in zip(demos, batch, strict=True)
        ]
        if spec.kind == "generate":
            raw = inference.generate(model, prompts, spec.decoding, device)
            answers = [prepared.postprocess(until_stop(text, model.stop_strings())) for text in raw]
            predictions = [{"resps": [r], "prediction": a} for r, a in zip(raw, answers, strict=True)]
        else:
            examples = [e for _, e in batch]
            scores = rank_with_ensembles(model, prepared, demos, examples, shots, seed, class_ids, device)
            names = [prepared.data.class_names or e.info["choices"] for e in examples]
            predictions = [class_prediction(n, row) for n, row in zip(names, scores, strict=True)]
        for (index, example), ds, prompt, prediction in zip(batch, demos, prompts, predictions, strict=True):
            # the prompt as the model read it, in its own tokens (IDEFICS': <fake_token_around_image>, </s>)
            seen = dataclasses.replace(prompt, text=model.config.special_tokens.model_text(prompt.text))
            records.append(sample_record(spec, index, example, ds, seen, prediction, shots, trial, seed))
    return records


def rank_with_ensembles(model, prepared, demos, examples, shots, seed, class_ids, device) -> torch.Tensor:
    """Class log-likelihoods averaged over demonstration orders (prompt ensembling; one order when disabled)."""
    config, spec = prepared.config, prepared.spec
    orders_per_example = [
        demo_orders(d, config.prompt_ensembles, f"{seed}/{e.key}")
        for d, e in zip(demos, examples, strict=True)
    ]
    if class_ids is None:  # each example ranks its own choices (info["choices"])
        choices = [tokenize_answers(model, spec, e.info["choices"]) for e in examples]
    total = None
    for k in range(len(orders_per_example[0])):
        prompts = [
            build_prompt(spec.prompt, orders[k], e, shots, dialogue_format(model))
            for orders, e in zip(orders_per_example, examples, strict=True)
        ]
        if class_ids is None:
            scores = inference.rank_choices(model, prompts, choices, device, config.length_normalize)
        else:
            scores = inference.rank_classes(
                model, prompts, class_ids, device, config.rank_rows, config.length_normalize
            )
        total = scores if total is None else total + scores
    return total / len(orders_per_example[0])


def demo_orders(demos: list[Example], wanted: int, seed: str) -> list[list[Example]]:
    """The given order first, then further distinct random orders, up to `wanted` (at most len(demos)!)."""
    count = min(wanted, math.factorial(len(demos)))
    if count <= 6 and len(demos) <= 8:  # small: draw from all permutations without repeats
        others = list(islice(permutations(range(len(demos))), 1, None))
        chosen = random.Random(seed).sample(others, count - 1)
    else:
        rng, chosen = random.Random(seed), []
        while len(chosen) < count - 1:
            order = tuple(rng.sample(range(len(demos)), len(demos)))
            if order != tuple(range(len(demos))) and order not in chosen:
                chosen.append(order)
    return [list(demos)] + [[demos[i] for i in order] for order in chosen]


def tokenize_answers(model, spec: TaskSpec, names: list[str]) -> list[list[int]]:
    """The class names as the prompt's continuation: after a space where the template that ends the prompt
    writes one before its answer (the task's, or a flamingo-kind dialogue format's: IDEFICS-instruct's
    "Assistant: {answer}"); a chat template's generation prompt ends with its own whitespace."""
    dialogue = dialogue_format(model)
    if dialogue is None:
        follows_space = answer_follows_space(spec.prompt.template)
    else:
        follows_space = dialogue[0].kind == "flamingo" and answer_follows_space(dialogue[0].template)
    space = " " if follows_space else ""
    return inference.tokenize_class_names(model.tokenizer, [space + n for n in names])


def class_prediction(class_names: list[str], scores: torch.Tensor) -> dict:
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    kept = order if len(order) <= MAX_STORED_SCORES else order[:5]
    return {"scores": {class_names[i]: float(scores[i]) for i in kept}, "prediction": class_names[order[0]]}


def sample_record(spec, index, example, demos, prompt, prediction, shots, trial, seed) -> dict:
    record = {
        "index": index,
        "doc_id": example.id,
        "task": spec.name,
        "shots": shots,
        "trial": trial,
        "seed": seed,
        "prompt": prompt.text,
        "images": [str(path) for path in prompt.images],
        "demo_ids": [d.id for d in demos],
        "target": example.target,
        "references": example.references,
        "resps": prediction.get("resps", [prediction["prediction"]]),
        "filtered_resps": [prediction["prediction"]],
        "prediction": prediction["prediction"],
    }
    if spec.metric == "cider":
        record.update(image_id=example.id, caption=prediction["prediction"])
    elif spec.metric == "vqa_accuracy":
        record.update(question_id=example.id, answer=prediction["prediction"])
    else:
        record.update(id=example.id, scores=prediction["scores"])
    return record


def predictions_from_records(spec: TaskSpec, records: list[dict]) -> dict[str, object]:
    if spec.kind == "generate":
        return {str(r["doc_id"]): r["prediction"] for r in records}
    return {str(r["doc_id"]): {"scores": r["scores"], "prediction": r["prediction"]} for r in records}


def score_records(
    spec: TaskSpec, examples: list[Example], records: list[dict], vqa_metric: str = DEFAULT_VQA_METRIC
) -> dict:
    scored = score_task(spec, examples, predictions_from_records(spec, records), vqa_metric)
    for record in records:
        record["score"] = scored.per_example[str(record["doc_id"])]
        record[spec.metric] = record["score"]
    return scored.metrics


def summarize(shots, count, seeds, values, per_trial, prepared) -> dict:
    array = np.array(values, dtype=float)
    finite = array[~np.isnan(array)]
    return {
        "shots": shots,
        "num_demos": count,
        "metric": prepared.spec.metric,
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std())
        if finite.size
        else math.nan,  # population std over trials, as OpenFlamingo
        "trials": values,
        "seeds": seeds,
        "metrics_per_trial": per_trial,
        "num_examples": len(prepared.data.eval_examples),
        "num_evaluated": len(prepared.evaluated),
    }


def task_config(prepared: PreparedRun) -> dict:
    config = dataclasses.asdict(prepared.config)
    config["seeds"] = prepared.config.seeds()
    return {"task": describe(prepared.spec), "eval": config}


def run_config(model, prepared: PreparedRun, ranks: Ranks) -> dict:
    return {
        "model": str(prepared.config.checkpoint) if prepared.config.checkpoint else None,
        "model_config": model.config.to_dict(),
        "batch_size": prepared.config.batch_size,
        "device": prepared.config.device,
        "world_size": ranks.world_size,
    }
