"""A training run is one `RunConfig`: small dataclasses per concern, read from a TOML recipe plus `--a.b value`.

Every key is checked against the dataclass fields and every value against the field's type, so a typo or a bad
value is a one-line ValueError naming the key (`train.lr: expected a float, got 'fast'`), never a silent default.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config_loader import coerce, field_types, from_dict, type_name, unwrap_optional
from ..errors import InputError
from ..model.config import FlamingoConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CHAT_TASK = "easy_vqa_chat"  # the chat-format evaluation (train/evaluate.py), besides eval.tasks.TASKS


@dataclass
class DatasetConfig:
    """One training dataset; each has its own batch size and loss weight (loss = sum of weight * dataset loss)."""

    batch_size: int = 8  # samples per micro-step over all ranks together (split evenly across ranks)
    loss_weight: float = 1.0
    enabled: bool = True  # a recipe's dataset can be switched off from the command line
    kind: str = "pairs"  # "pairs" (one image + caption) or "interleaved" (documents with several images)
    path: str | None = None  # where the real loader finds the data (shards, a converted dataset, ...)
    num_samples: int | None = None  # samples the recipe plans to see (documentation for the real loader)
    seq_len: int = 64  # max tokens per sample
    max_images: int = 1  # max images per sample
    options: dict = field(default_factory=dict)  # loader-specific settings; the loader builder validates them


def rank_batch_size(name: str, dataset: DatasetConfig, world_size: int) -> int:
    if dataset.batch_size % world_size:
        raise InputError(
            f"datasets.{name}.batch_size: {dataset.batch_size} is not divisible by the {world_size} processes"
        )
    return dataset.batch_size // world_size


@dataclass
class DataConfig:
    # A registered name ("synthetic") or "package.module:function"; see openflamingo.train.data.build_loader.
    loader: str = "synthetic"
    seed: int | None = None  # defaults to train.seed
    # Read the frozen vision encoder's output per image from a cache built once (openflamingo.data.features)
    # instead of decoding, preprocessing and encoding every image at every step: its output for an image never
    # changes while it is frozen. "shards" loader only; costs disk (images x num_tokens x dim x dtype bytes).
    feature_cache: bool = False
    # How the cache stores the tokens: "auto" (the encoder's output dtype: exact) | "bf16" | "fp16" | "fp32". bf16 or
    # fp16 halve an fp32 output's disk; lookups cast back, so the loss moves by that rounding only.
    feature_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warmup
    warmup_steps: int = 0  # counted in optimizer steps
    # linear/cosine: decay over only the last decay_steps steps, at lr until then (warmup-stable-decay); unset: decay
    # from the end of warmup.
    decay_steps: int | None = None
    min_lr: float = 0.0  # where linear/cosine decay ends
    weight_decay: float = 0.1
    # Which parameters decay: "cross_attention" (OpenFlamingo: cross-attention matrices only, no gates/norms/biases),
    # "matrices" (every trainable matrix) or "none".
    decay: Literal["cross_attention", "matrices", "none"] = "cross_attention"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # lr multipliers by parameter-name prefix, e.g. {added_tokens = 10.0}: the special-token embeddings must move
    # far from their initial rows, while the wide perceiver/cross-attention layers collapse at a large lr.
    lr_scale: dict[str, float] = field(default_factory=dict)
    max_grad_norm: float = 1.0  # global gradient clipping; 0 disables (the norm is still logged)
    seed: int = 0
    max_nonfinite_in_row: int = 5  # NaN/inf steps are skipped; this many in a row stop the run
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    # torch.use_deterministic_algorithms for the run: reruns and resumes give bitwise-identical results
    # (docs/reproducibility.md). Unset: on for CPUs (costs little there), off for GPUs (deterministic kernels are
    # slower).
    deterministic: bool | None = None
    output_dir: str = "runs/default"


@dataclass
class PrecisionConfig:
    # "auto": bf16 on CUDA; fp32 on CPU, where bf16 matmuls are far slower than fp32 on common x86 cores.
    autocast: Literal["auto", "bf16", "fp32"] = "auto"
    # Storage of the frozen backbones; "auto": autocast's choice.
    frozen_dtype: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass
class ParallelConfig:
    mode: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: ddp when launched with several processes
    activation_checkpointing: bool = (
        False  # recompute each (cross-attention + decoder layer) unit in backward
    )
    # torch.compile the decoder layers, cross-attention blocks and perceiver: "auto" (on CUDA only; on CPUs
    # compiling costs minutes and gains nothing) | true | false. Any: a string or a bool, checked in validate().
    compile: Any = "auto"
    compile_backend: str = "inductor"
    fsdp_reshard_after_forward: bool = True


@dataclass
class CheckpointConfig:
    every: int = 100  # optimizer steps between checkpoints; 0: only at the end
    keep: int = 3  # newest checkpoints kept
    resume: str = (
        "auto"  # "auto" (latest in output_dir/checkpoints, if any) | "none" | a checkpoint name or path
    )
    export: bool = True  # save_pretrained the final model to output_dir/final


@dataclass
class LogConfig:
    every: int = 1  # steps between metric records
    progress: bool = True  # console progress bar (rank 0)
    jsonl: bool = True  # output_dir/metrics.jsonl
    tensorboard: bool = True  # output_dir/tensorboard
    wandb: bool = False
    wandb_project: str = "openflamingo"
    mfu: bool = True  # count FLOPs per token on one extra micro-step at start-up (see train/metrics.py)
    # Peak FLOP/s per device for MFU, in TFLOP/s; 0: known GPUs from a table, CPUs by a short fp32 matmul probe.
    peak_tflops: float = 0.0


@dataclass
class ExtraEvaluation:
    """Another task evaluated after `evaluate.task`, with its own default prompt."""

    shots: list[int] = field(default_factory=lambda: [0])
    num_samples: int | None = None  # None: evaluate.num_samples


@dataclass
class EvaluateConfig:
    """A few-shot evaluation of the exported model after training (rank 0), e.g. the demo's easy-VQA check."""

    # An openflamingo.eval task such as "easy_vqa"; None: no evaluation (the extra tasks neither).
    task: str | None = None
    shots: list[int] = field(default_factory=lambda: [0, 4])
    num_samples: int | None = 500  # held-out examples
    blind: bool = True  # also evaluate with cross-attention switched off (is the model using the images?)
    blind_shots: list[int] | None = None  # the shot counts evaluated blind (None: every task's all)
    zero_shot: str = (
        "none"  # "none": 0-shot is the bare question | "text-demos": Flamingo's two text-only demos
    )
    prompt: str | None = None  # the task's prompt template; match the training text format
    separator: str | None = None
    batch_size: int = 16
    # More tasks after `task`, e.g. the demo's [evaluate.extra_tasks.easy_vqa_binding] shots = [0, 1, 2, 4].
    extra_tasks: dict[str, ExtraEvaluation] = field(default_factory=dict)
    before: bool = False  # also score the starting weights (fine-tuning from model.init_from) before training

    def __post_init__(self) -> None:
        # Checked when the recipe is read, not after the training it follows.
        from ..eval.tasks import TASKS

        known = [*TASKS, CHAT_TASK]
        named = {"evaluate.task": self.task, **{f"evaluate.extra_tasks.{t}": t for t in self.extra_tasks}}
        for key, task in named.items():
            if task is not None and task not in known:
                raise InputError(f"{key}: unknown task {task!r}; known: {', '.join(known)}")


@dataclass
class RunConfig:
    model: FlamingoConfig = field(default_factory=FlamingoConfig)
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def enabled_datasets(self) -> dict[str, DatasetConfig]:
        return {name: d for name, d in self.datasets.items() if d.enabled}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return out


# ----- semantic checks that a type cannot express ----------------------------------------------------------------
def validate(config: RunConfig) -> RunConfig:
    compile_ = config.parallel.compile
    if not (isinstance(compile_, bool) or compile_ == "auto"):
        raise InputError(f'parallel.compile: expected "auto", true or false, got {compile_!r}')
    t = config.train
    positive = {"train.steps": t.steps, "train.grad_accum": t.grad_accum, "log.every": config.log.every}
    positive["checkpoint.keep"] = config.checkpoint.keep
    for key, value in positive.items():
        if value < 1:
            raise InputError(f"{key}: must be >= 1, got {value}")
    non_negative = {
        "train.lr": t.lr,
        "train.min_lr": t.min_lr,
        "train.warmup_steps": t.warmup_steps,
        "train.weight_decay": t.weight_decay,
        "train.max_grad_norm": t.max_grad_norm,
        "train.max_nonfinite_in_row": t.max_nonfinite_in_row,
        "checkpoint.every": config.checkpoint.every,
        "log.peak_tflops": config.log.peak_tflops,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise InputError(f"{key}: must be >= 0, got {value}")
    for prefix, scale in t.lr_scale.items():
        if scale < 0:
            raise InputError(f"train.lr_scale.{prefix}: must be >= 0, got {scale}")
    if t.decay_steps is not None and (t.decay_steps < 1 or t.schedule == "constant"):
        raise InputError(
            f"train.decay_steps: {t.decay_steps} needs >= 1 and a linear or cosine train.schedule, "
            f"not {t.schedule!r}"
        )
    if t.min_lr > t.lr:
        raise InputError(f"train.min_lr: {t.min_lr} is above train.lr={t.lr}")
    if config.data.feature_cache and config.data.loader != "shards":
        raise InputError(
            f'data.feature_cache: only the "shards" loader reads a feature cache, not '
            f"data.loader={config.data.loader!r}"
        )
    if not config.enabled_datasets():
        raise InputError("datasets: no enabled dataset; add a [datasets.NAME] table with batch_size > 0")
    for name, d in config.enabled_datasets().items():
        if d.batch_size < 1:
            raise InputError(f"datasets.{name}.batch_size: must be >= 1, got {d.batch_size}")
        if d.loss_weight < 0:
            raise InputError(f"datasets.{name}.loss_weight: must be >= 0, got {d.loss_weight}")
        if d.seq_len < 2 or d.max_images < 1:
            raise InputError(f"datasets.{name}: seq_len must be >= 2 and max_images >= 1")
    return config


# ----- TOML recipes and command-line overrides ---------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- TOML recipe at `path` <- overrides (`["--train.lr", "3e-4", "--log.wandb=true"]`)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"--config: {path} is not a file")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise InputError(f"{path}: not valid TOML ({error})") from None
    for key, text in parse_overrides(overrides or []):
        apply_override(data, key, text)
    return run_config(data)


def run_config(data: dict[str, Any]) -> RunConfig:
    """A checked RunConfig from plain data (a parsed recipe). `model.preset` names an architecture the model
    section starts from; a model that starts from saved weights (`model.init_from`) takes its architecture from that
    checkpoint."""
    model = data.get("model")
    if isinstance(model, dict) and "preset" in model:
        from ..model.presets import with_preset

        model = with_preset(model)
        data = {**data, "model": model}
    if isinstance(model, dict) and model.get("init_from"):
        from ..model.checkpoint import init_config

        data = {**data, "model": init_config(model)}
    return validate(from_dict(RunConfig, data, ""))


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """`--a.b value` / `--a.b=value` pairs -> [(a.b, value)]."""
    pairs, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise InputError(f"{token}: expected an override --section.key VALUE")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise InputError(f"--{key}: missing value")
            value, i = tokens[i + 1], i + 1
        if "." not in key:
            raise InputError(f"--{key}: overrides name a section and a key, e.g. --train.lr 3e-4")
        pairs.append((key, value))
        i += 1
    return pairs


def apply_override(data: dict[str, Any], key: str, text: str) -> None:
    """Set `data[a][b]... = text` parsed as the type the dataclasses declare for `a.b...`."""
    parts = key.split(".")
    tp: Any = RunConfig
    node = data
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        tp, _ = unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            fields = field_types(tp)
            if part not in fields:
                where = ".".join(parts[:depth]) or "config"
                raise InputError(f"{here}: unknown key; known keys of {where}: {', '.join(fields)}")
            tp = fields[part]
        elif tp is dict or typing.get_origin(tp) is dict:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
            if tp is not Any and part not in node:
                raise InputError(f"{here}: no such entry; defined: {', '.join(node) or 'none'}")
        elif tp is not Any:
            raise InputError(f"{here}: {'.'.join(parts[:depth])} is a {type_name(tp)}, it has no keys")
        if depth < len(parts) - 1:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"{here}: is not a table in the recipe")
            node = child
    node[parts[-1]] = parse_value(text, tp, key)


def parse_value(text: str, tp: Any, key: str) -> Any:
    """A command-line string as the declared type: strings stay verbatim, the rest is read as a TOML value."""
    inner, optional = unwrap_optional(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    if inner is str:
        return text
    if typing.get_origin(inner) is Literal and all(
        isinstance(choice, str) for choice in typing.get_args(inner)
    ):
        return coerce(text, tp, key)  # a choice is a bare word on the command line
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if inner is Any:
            return text
        raise InputError(f"--{key}: expected {type_name(inner)}, got {text!r}") from None
    return coerce(value, tp, key)


def to_toml(data: dict[str, Any]) -> str:
    """A nested dict as TOML (tables for dicts, None values omitted): the resolved config saved with a run."""
    lines: list[str] = []

    def scalar(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v if x is not None) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{tkey(k)} = {scalar(x)}" for k, x in v.items() if x is not None) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def tkey(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    def table(prefix: str, d: dict[str, Any]) -> None:
        plain = {k: v for k, v in d.items() if v is not None and not isinstance(v, dict)}
        nested = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (plain or not nested):
            lines.append(f"\n[{prefix}]")
        lines.extend(f"{tkey(k)} = {scalar(v)}" for k, v in plain.items())
        for k, v in nested.items():
            table(f"{prefix}.{tkey(k)}" if prefix else tkey(k), v)

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"
