"""Golden losses: the first 20 optimizer steps of tests/fixtures/golden/recipe.toml, bit for bit.

tests/fixtures/golden/losses.json holds each step's loss, gradient norm and per-dataset loss as float.hex() strings
(one entry per transformers major version). Any change to the numerics of training shows here as a diff; a commit
that makes one on purpose regenerates the goldens with each venv:

    .venv/bin/python tools/golden/update.py
    .venv-transformers4/bin/python tools/golden/update.py

The recipe runs through `openflamingo train` in a subprocess whose numerics are pinned (one thread, PyTorch's
baseline kernels, MKL's CPU-independent code path, no oneDNN; see tools/golden/update.py), so that the bits are the
same on Intel and AMD CPUs with or without AVX-512.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from openflamingo.train.config import load_config, to_toml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("golden_update", ROOT / "tools" / "golden" / "update.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

UPDATE = f"{sys.executable} tools/golden/update.py"


@pytest.fixture(scope="module")
def fixture() -> dict:
    return golden.read_fixture()


@pytest.fixture(scope="module")
def expected(fixture) -> dict:
    entry = fixture.get("goldens", {}).get(golden.golden_key())
    if entry is None:
        pytest.fail(
            f"tests/fixtures/golden/losses.json has no golden for {golden.golden_key()}: record one with\n"
            f"    {UPDATE}",
            pytrace=False,
        )
    return entry


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory) -> dict:
    """The recipe as it is, in the pinned environment, with only its output directory moved."""
    directory = tmp_path_factory.mktemp("golden")
    record = golden.run_recipe(directory)
    record["output_dir"] = directory / "run"
    return record


def test_the_golden_recipe_reproduces_its_losses_bitwise(golden_run, expected):
    text = golden.report(expected, golden_run, golden.golden_key())
    if text:
        pytest.fail(text, pytrace=False)
    assert golden_run["final_weights_sha256"] == expected["final_weights_sha256"]


def test_the_golden_is_the_recipe_file_and_a_one_in_ten_million_lr_change_shows(
    golden_run, fixture, expected, tmp_path
):
    assert fixture["recipe_sha256"] == golden.recipe_sha256(), (
        f"{golden.RECIPE.relative_to(ROOT)} changed since the goldens were recorded; regenerate them:\n    {UPDATE}"
    )
    # No hidden overrides: the run was given the recipe and its output directory, and the config it resolved and
    # saved is the recipe's own.
    output_dir = str(golden_run["output_dir"])
    assert golden_run["arguments"] == ["--train.output_dir", output_dir]
    config = load_config(golden.RECIPE, ["--train.output_dir", output_dir])
    assert (golden_run["output_dir"] / "config.toml").read_text() == to_toml(config.to_dict())
    assert golden_run["cpu_capability"] == "DEFAULT" and golden_run["mkldnn_enabled"] is False

    # The recipe exercises what it claims: both datasets every step, clipping on some steps and not on others.
    steps = expected["steps"]
    assert sorted(map(int, steps)) == list(range(1, config.train.steps + 1))
    assert all(set(s["dataset_loss"]) == set(config.datasets) for s in steps.values())
    norms = [float.fromhex(s["grad_norm"]) for s in steps.values()]
    assert min(norms) < config.train.max_grad_norm < max(norms)
    assert len({s["loss"] for s in steps.values()}) == len(steps)

    # Not vacuous: with the lr times (1 + 1e-7) the same comparison fails. Such a change moves the losses by ~1e-8
    # relative (no tolerance would see it) and leaves the first step, taken before any update, bit for bit alike.
    perturbed = golden.run_recipe(tmp_path, ["--train.lr", repr(config.train.lr * (1 + 1e-7))])
    assert perturbed["steps"]["1"] == steps["1"]
    lines = golden.differences(expected, perturbed)
    assert any(" loss " in line for line in lines), lines
    assert perturbed["final_weights_sha256"] != expected["final_weights_sha256"]
