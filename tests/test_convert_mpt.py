"""MosaicGPT (3B's LM) and remote-code MPT (9B's LM) directories convert to transformers' MptForCausalLM and
reproduce MosaicML's own code (fixtures by tools/mpt_parity/make_fixtures.py), without running remote code."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openflamingo.model.convert.mpt import convert_mosaic_gpt, is_remote_code_mpt, load_mpt_with_qk_layernorm

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mpt_parity"
BUNDLES = ["mosaic_gpt_1b", "mpt_7b"]


def converted(bundle: str, tmp_path: Path) -> torch.nn.Module:
    out = tmp_path / f"{bundle}-hf"
    report = convert_mosaic_gpt(FIXTURES / bundle / "lm", out)
    assert report.tensors == len(load_file(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    if config["attn_config"]["qk_ln"]:
        return load_mpt_with_qk_layernorm(out).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out).float().eval()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_converted_model_reproduces_mosaicml_logits_loss_and_greedy_tokens(bundle, tmp_path):
    assert is_remote_code_mpt(FIXTURES / bundle / "lm")
    model = converted(bundle, tmp_path)
    ref = load_file(FIXTURES / bundle / "reference.safetensors")
    mask = ref["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"], attention_mask=mask.long(), labels=ref["labels"])
    # padded positions compute nothing meaningful in either implementation
    diff = (out.logits - ref["logits"])[mask].abs().max()
    assert diff <= 1e-4, f"max |logit diff| {diff:.2e}"
    assert abs(out.loss.item() - ref["loss"].item()) <= 1e-4

    prompt = ref["prompt"]
    new_tokens = ref["sequences"].shape[1] - prompt.shape[1]
    generated = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert torch.equal(generated.sequences, ref["sequences"])
    assert (torch.stack(generated.logits, 1) - ref["step_logits"]).abs().max() <= 1e-4


def test_unknown_options_and_keys_are_one_line_errors_naming_them(tmp_path):
    source = FIXTURES / "mosaic_gpt_1b" / "lm"
    report = convert_mosaic_gpt(source, tmp_path / "out")
    assert report.summary().startswith("mosaic_gpt -> transformers MptForCausalLM") and report.qk_layernorm

    def edited(name: str, change) -> Path:
        directory = tmp_path / name
        shutil.copytree(source, directory)
        config = json.loads((directory / "config.json").read_text())
        change(config, directory)
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    def error(directory: Path) -> str:
        with pytest.raises(ValueError) as caught:
            convert_mosaic_gpt(directory, tmp_path / f"{directory.name}-out")
        message = str(caught.value)
        assert "\n" not in message and str(directory) in message
        return message

    assert "logit_scale" in error(edited("scale", lambda c, d: c.update(logit_scale=0.5)))
    assert "rope" in error(edited("rope", lambda c, d: c.update(rope=True)))
    assert "prefix_lm" in error(edited("prefix", lambda c, d: c.update(prefix_lm=True)))
    assert "clip_qkv together with qk_ln" in error(edited("clip", lambda c, d: c.update(attn_clip_qkv=6)))
    assert "n_heads = 12" in error(edited("heads", lambda c, d: c.update(n_heads=12, d_model=48)))

    def extra_weight(config, directory):
        state = torch.load(directory / "pytorch_model.bin", weights_only=True)
        state["transformer.blocks.0.attn.rotary.inv_freq"] = torch.zeros(2)
        torch.save(state, directory / "pytorch_model.bin")

    assert "1 unknown weight(s): transformer.blocks.0.attn.rotary.inv_freq" in error(
        edited("extra", extra_weight)
    )

    def missing_weight(config, directory):
        state = torch.load(directory / "pytorch_model.bin", weights_only=True)
        del state["transformer.blocks.1.attn.k_ln.weight"]
        torch.save(state, directory / "pytorch_model.bin")

    assert "missing weight(s): transformer.blocks.1.attn.k_ln.weight" in error(
        edited("missing", missing_weight)
    )
