"""OpenFlamingo state dicts convert strictly, in both the released and the full format, from Python and the CLI."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import openflamingo
from openflamingo import build_flamingo
from openflamingo.cli import main as cli_main
from openflamingo.model.convert.openflamingo import (
    convert_open_flamingo_state_dict,
    load_open_flamingo_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "parity"
BUNDLES = sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file())
sys.path.insert(0, str(ROOT / "tools" / "parity"))
from check import flamingo_config  # noqa: E402


def bundle_model(bundle: Path):
    meta = json.loads((bundle / "config.json").read_text())
    return build_flamingo(flamingo_config(bundle, meta), seed=0), load_file(bundle / "state_dict.safetensors")


def released_format(state: dict, layers_path: str) -> dict:
    """What OpenFlamingo's training saves: trainable tensors only, one name each."""
    keep = re.compile(
        rf"perceiver\..*|lang_encoder\.{re.escape(layers_path)}\.\d+\.gated_cross_attn_layer\..*"
    )
    released = {k: v for k, v in state.items() if keep.fullmatch(k)}
    embedding = next(
        k for k in state if k.endswith("embed_tokens.weight") or k.endswith(("wte.weight", "embed_in.weight"))
    )
    released[embedding] = state[embedding]
    return released


def test_parity_bundles_exist_for_four_families():
    assert {b.name for b in BUNDLES} >= {"llama", "opt", "gpt_neox", "mpt"}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_released_format_converts_to_the_same_flamingo_weights(bundle):
    full_model, state = bundle_model(bundle)
    full_report = load_open_flamingo_state_dict(full_model, state)
    assert full_report.format == "full" and full_report.aliases > 0

    released_model, _ = bundle_model(bundle)
    released_model.language_model.load_state_dict(full_model.language_model.state_dict())
    released_model.vision_encoder.load_state_dict(full_model.vision_encoder.state_dict())
    report = load_open_flamingo_state_dict(
        released_model, released_format(state, full_model.decoder_layers_path)
    )
    assert report.format == "released"
    ours = released_model.state_dict()
    for key, value in full_model.state_dict().items():
        if key != "added_tokens.output":  # the released format has no output rows (OpenFlamingo froze them)
            assert torch.equal(ours[key], value), key


def test_unknown_missing_and_conflicting_keys_are_errors():
    model, state = bundle_model(FIXTURES / "llama")
    with pytest.raises(ValueError, match=r"1 unknown OpenFlamingo key\(s\): lang_encoder.something_new"):
        convert_open_flamingo_state_dict({**state, "lang_encoder.something_new": torch.zeros(1)}, model)
    without_latents = {k: v for k, v in state.items() if k != "perceiver.latents"}
    with pytest.raises(ValueError, match="have no source in the checkpoint: perceiver.latents"):
        convert_open_flamingo_state_dict(without_latents, model)
    alias = next(
        k for k in state if k.startswith("lang_encoder.gated_cross_attn_layers.") and k.endswith("attn_gate")
    )
    with pytest.raises(ValueError, match="both map to .* but differ"):
        convert_open_flamingo_state_dict({**state, alias: state[alias] + 1}, model)


def test_cli_converts_a_released_checkpoint_and_the_result_reproduces_the_peer(tmp_path, capsys):
    bundle = FIXTURES / "llama"
    model, state = bundle_model(bundle)
    load_open_flamingo_state_dict(model, state)
    # backbones as a user has them: an HF LM directory and an open_clip checkpoint with its config beside it
    model.language_model.save_pretrained(tmp_path / "lm")
    model.tokenizer.save_pretrained(tmp_path / "lm")
    visual = {k[len("vision_encoder.") :]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    save_file({f"visual.{k}": v.contiguous() for k, v in visual.items()}, tmp_path / "open_clip.safetensors")
    (tmp_path / "open_clip_config.json").write_text((bundle / "open_clip_config.json").read_text())
    torch.save(released_format(state, model.decoder_layers_path), tmp_path / "checkpoint.pt")

    rc = cli_main(
        [
            "convert",
            "open-flamingo",
            str(tmp_path / "checkpoint.pt"),
            "--language-model",
            str(tmp_path / "lm"),
            "--vision-encoder",
            str(tmp_path / "open_clip.safetensors"),
            "--out",
            str(tmp_path / "converted"),
            "--heads",
            str(
                json.loads((bundle / "config.json").read_text())["flamingo_fixed_hparams"]["perceiver"][
                    "heads"
                ]
            ),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "OpenFlamingo released state dict converted" in capsys.readouterr().out
    converted = openflamingo.load(tmp_path / "converted").eval()
    inputs, outputs = load_file(bundle / "inputs.safetensors"), load_file(bundle / "outputs.safetensors")
    logits = converted(
        input_ids=inputs["lang_x"],
        images=inputs["vision_x"],
        attention_mask=inputs["attention_mask"],
        num_images=(inputs["lang_x"] == converted.special_ids.media).sum(1),
    ).logits
    # the released format lacks the frozen output rows of the added tokens: compare the LM's own vocabulary
    n = converted.special_ids.first_added
    assert (logits[..., :n] - outputs["logits"][..., :n]).abs().max() < 1e-4


def test_cli_reports_a_non_weights_file_in_one_line(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    rc = cli_main(
        [
            "convert",
            "open-flamingo",
            str(tmp_path / "checkpoint.pt"),
            "--language-model",
            "x",
            "--vision-encoder",
            "y",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "cannot be read as a weights-only checkpoint" in err
        and len(err.strip().splitlines()) == 1
    )


def test_parity_check_command_passes_on_the_fixtures():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "parity" / "check.py"), *map(str, BUNDLES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert len(lines) == len(BUNDLES) and all(line["ok"] and line["generation_equal"] for line in lines)
    assert max(line["max_abs_logit_diff"] for line in lines) <= 1e-4
