"""Run configs: recipes, command-line overrides, errors that name the key, schedules. No model is built here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from openflamingo.train.cli import main, register
from openflamingo.train.config import RunConfig, TrainConfig, load_config, to_toml, validate
from openflamingo.train.optim import LRSchedule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("size", ["3b", "4b", "9b"])
def test_openflamingo_recipes_follow_the_paper(size):
    config = load_config(CONFIGS / f"openflamingo-{size}.toml")
    data = config.enabled_datasets()
    assert {n: (d.kind, d.num_samples, d.loss_weight) for n, d in data.items()} == {
        "interleaved": ("interleaved", 60_000_000, 1.0),
        "pairs": ("pairs", 120_000_000, 0.2),
    }
    # Both datasets are seen exactly once over the run.
    assert all(d.batch_size * config.train.steps == d.num_samples for d in data.values())
    t = config.train
    assert (t.lr, t.schedule, t.weight_decay, t.decay) == (1e-4, "constant", 0.1, "cross_attention")
    assert t.warmup_steps > 0 and config.model.cross_attention.gate_init == 0.0
    assert config.model.cross_attention.every_n_layers == {"3b": 1, "4b": 2, "9b": 4}[size]


def test_demo_recipe_loads_with_its_model_init_options():
    config = load_config(CONFIGS / "demo.toml")
    assert config.model.language_model == "smollm2-135m"
    assert config.model.cross_attention.gate_init == 1.0 and config.model.cross_attention.zero_init_output
    assert config.model.vision.feature_stages == (1, 2) and config.model.vision.image_size == 96
    assert config.model.vision.crop_padding == 0 and config.model.perceiver.latent_init_std == 0.02
    assert config.train.lr_scale == {"added_tokens": 1.5, "perceiver": 0.0}
    assert config.data.loader == "shards" and config.evaluate.task == "easy_vqa"
    assert {d.path for d in config.enabled_datasets().values()} == {
        "easy-vqa:pairs",
        "easy-vqa:vqa",
        "easy-vqa:binding",
    }
    assert config.data.feature_cache and set(config.evaluate.extra_tasks) == {"easy_vqa_binding"}


def test_command_line_overrides_are_typed_and_nested(tmp_path):
    config = load_config(
        CONFIGS / "demo.toml",
        [
            "--train.lr",
            "2e-4",
            "--train.lr_scale.added_tokens",
            "5",
            "--datasets.vqa.batch_size=8",
            "--datasets.vqa_fewshot.enabled",
            "false",
            "--datasets.captions.enabled",
            "false",
            "--datasets.binding.enabled=false",
            "--model.cross_attention.gate_init",
            "0",
            "--parallel.activation_checkpointing",
            "true",
            "--train.betas",
            "[0.9, 0.95]",
            "--train.output_dir",
            "123",  # a string field keeps the text verbatim
            "--model.vision.path",
            "none",
        ],
    )
    assert config.train.lr == 2e-4 and isinstance(config.model.cross_attention.gate_init, float)
    assert config.train.lr_scale == {"added_tokens": 5.0, "perceiver": 0.0}
    assert config.datasets["vqa"].batch_size == 8 and list(config.enabled_datasets()) == ["vqa"]
    assert config.parallel.activation_checkpointing is True
    assert config.train.betas == (0.9, 0.95) and config.train.output_dir == "123"
    assert config.model.vision.path is None


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = load_config(CONFIGS / "openflamingo-9b.toml", ["--datasets.pairs.options.workers", "4"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config.to_dict()))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.lrr", "1"], r"^train\.lrr: unknown key; known keys of train: steps, "),
        (["--trian.lr", "1"], r"^trian: unknown key"),
        (["--train.lr", "fast"], r"^--train\.lr: expected float, got 'fast'"),
        (["--train.steps", "2.5"], r"^train\.steps: expected int, got 2\.5"),
        (["--train.steps", "0"], r"^train\.steps: must be >= 1, got 0"),
        (["--train.schedule", "step"], r"^train\.schedule: 'step' is not one of constant, linear, cosine"),
        (["--parallel.activation_checkpointing", "yes"], r"activation_checkpointing: expected bool"),
        (
            ["--datasets.laion.batch_size", "8"],
            r"^datasets\.laion: no such entry; defined: captions, vqa, vqa_fewshot",
        ),
        (["--datasets.vqa.batch_size", "0"], r"^datasets\.vqa\.batch_size: must be >= 1"),
        (["--model.perceiver.depthh", "2"], r"^model\.perceiver\.depthh: unknown key"),
        (["--model.vision.kind", "resnet"], r"^model\.vision: vision\.kind='resnet' is not known"),
        (["--train.betas", "[0.9]"], r"^train\.betas: expected 2 values"),
        (["--train.min_lr", "1"], r"^train\.min_lr: 1\.0 is above train\.lr"),
        (
            ["--train.schedule", "constant", "--train.decay_steps", "20"],
            r"^train\.decay_steps: 20 needs >= 1 and a linear or cosine",
        ),
        (["--train.schedule", "linear", "--train.decay_steps", "0"], r"^train\.decay_steps: 0 needs >= 1"),
        (["--train.lr_scale.added_tokens", "-1"], r"^train\.lr_scale\.added_tokens: must be >= 0"),
        (["--train", "1"], r"^--train: overrides name a section and a key"),
        (["--train.lr"], r"^--train\.lr: missing value"),
        (["train.lr", "1"], r"^train\.lr: expected an override --section\.key VALUE"),
    ],
)
def test_unknown_keys_and_bad_values_are_errors_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "demo.toml", overrides)


def test_recipe_file_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlr = 1e-4\nwarmup = 100\n[datasets.a]\nbatch_size = 2\n")
    with pytest.raises(ValueError, match=r"^train\.warmup: unknown key"):
        load_config(path)
    path.write_text('[datasets.a]\nbatch_size = "8"\n')
    with pytest.raises(ValueError, match=r"^datasets\.a\.batch_size: expected int, got '8'"):
        load_config(path)
    path.write_text("[train]\n")
    with pytest.raises(ValueError, match=r"^datasets: no enabled dataset"):
        load_config(path)
    with pytest.raises(ValueError, match=r"^--config: .*missing\.toml is not a file"):
        load_config(tmp_path / "missing.toml")


def test_train_command_parses_overrides_and_reports_bad_ones_in_one_line(capsys):
    parser = argparse.ArgumentParser(prog="openflamingo")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "--config", "x.toml", "--train.lr", "3e-4", "--log.wandb=true"])
    assert args.config == "x.toml" and args.overrides == ["--train.lr", "3e-4", "--log.wandb=true"]
    assert main(["--train.lr", "fast"]) == 2  # without --config: the demo recipe, then the override
    err = capsys.readouterr().err.strip()
    assert err == "openflamingo train: error: --train.lr: expected float, got 'fast'"


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_warm_up_over_optimizer_steps_then_decay_to_min_lr(schedule):
    config = TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=4, schedule=schedule)
    lrs = [LRSchedule(config).lr(step) for step in range(10)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == 1.0
    assert lrs[-1] == pytest.approx(
        {"constant": 1.0, "linear": 0.25, "cosine": 0.1 + 0.45 * (1 - 3**0.5 / 2)}[schedule]
    )
    assert LRSchedule(config).lr(10) == pytest.approx(1.0 if schedule == "constant" else 0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_steps_hold_the_lr_until_the_last_steps(schedule):
    config = TrainConfig(steps=10, lr=1.0, min_lr=0.2, warmup_steps=2, schedule=schedule, decay_steps=4)
    lrs = [LRSchedule(config).lr(step) for step in range(11)]
    assert lrs[:7] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert lrs[7] == pytest.approx({"linear": 0.8, "cosine": 0.2 + 0.4 * (1 + 2**-0.5)}[schedule])
    assert lrs[10] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(lrs[6:], lrs[7:], strict=False))


def test_defaults_alone_are_not_a_run():
    with pytest.raises(ValueError, match="no enabled dataset"):
        validate(RunConfig())
