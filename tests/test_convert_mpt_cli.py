"""The MosaicGPT / MPT conversion from the command line and inside Flamingo building (QK LayerNorm kept)."""

import shutil
from pathlib import Path

import pytest

from openflamingo.cli import main as cli_main
from openflamingo.model.build import build_language_model
from openflamingo.model.config import FlamingoConfig
from openflamingo.model.convert.mpt import load_mpt_with_qk_layernorm

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mpt_parity"


def test_cli_converts_a_directory_and_reports_errors_in_one_line(tmp_path, capsys):
    source = FIXTURES / "mosaic_gpt_1b" / "lm"
    assert cli_main(["convert", "mosaic-gpt", str(source), str(tmp_path / "out")]) == 0
    assert "mosaic_gpt -> transformers MptForCausalLM" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "config.json").write_text(
        (source / "config.json").read_text().replace('"n_heads": 16', '"n_heads": 12')
    )
    assert cli_main(["convert", "mosaic-gpt", str(broken), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "n_heads = 12" in err and len(err.strip().splitlines()) == 1


def test_qk_layernorm_survives_a_flamingo_config_round_trip(tmp_path):
    """A Flamingo checkpoint that stores its LM by config rebuilds the QK LayerNorm (build_language_model)."""
    assert (
        cli_main(["convert", "mosaic-gpt", str(FIXTURES / "mosaic_gpt_1b" / "lm"), str(tmp_path / "hf")]) == 0
    )
    model = load_mpt_with_qk_layernorm(tmp_path / "hf")
    lm_config = model.config.to_dict()
    rebuilt, _ = build_language_model(
        FlamingoConfig(language_model_config=lm_config, tokenizer=str(_tokenizer_dir(tmp_path)))
    )
    assert set(rebuilt.state_dict()) == set(model.state_dict())
    assert any(k.endswith("attn.q_ln.weight") for k in rebuilt.state_dict())


def _tokenizer_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    return tmp_path / "tok"


def test_flamingo_build_refuses_an_unconverted_remote_code_directory():
    with pytest.raises(ValueError, match="convert it first: openflamingo convert mosaic-gpt"):
        build_language_model(FlamingoConfig(language_model=str(FIXTURES / "mpt_7b" / "lm")))
