"""The released OpenFlamingo models end to end, on reduced random stand-ins (tools/released_e2e/README.md).

Each bundle holds what a user downloads, in the release's own formats: `checkpoint.pt` as OpenFlamingo's training
saves it and the language model directory as published (MosaicGPT / MPT remote code for the 3B / 9B, with no Python
files; GPT-NeoX for the 4B), plus one open_clip ViT checkpoint for all. The command line converts them, and the
converted model must compute what OpenFlamingo 2.0.1 (with MosaicML's MPT code for the 3B and 9B) computed from the
same files: logits of an interleaved batch and greedy generation from few-shot prompts with images.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.train import one_thread  # noqa: F401 (an autouse fixture: tiny models run on one thread)
from PIL import Image
from safetensors.torch import load_file

import openflamingo
from openflamingo.cli import main as cli_main
from openflamingo.model.inputs import prepare_inputs

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "released_e2e"
VIT = FIXTURES / "vit" / "open_clip_pytorch_model.bin"
FAMILIES = ["openflamingo_3b", "openflamingo_4b", "openflamingo_9b"]
TOLERANCE = 1e-4


def convert(bundle: Path, out: Path, capsys) -> str:
    rc = cli_main(
        [
            "convert",
            "open-flamingo",
            str(bundle / "checkpoint.pt"),
            "--language-model",
            str(bundle / "lm"),
            "--vision-encoder",
            str(VIT),
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def images_of(reference: dict) -> list[list[Image.Image]]:
    array = reference["images_uint8"].numpy()
    return [[Image.fromarray(np.ascontiguousarray(image)) for image in sample] for sample in array]


@pytest.mark.parametrize("family", FAMILIES)
def test_released_family_converts_and_runs_like_openflamingo(family, tmp_path, capsys):
    bundle = FIXTURES / family
    meta = json.loads((bundle / "README.json").read_text())
    reference = load_file(bundle / "reference.safetensors")
    remote_code = "auto_map" in json.loads((bundle / "lm" / "config.json").read_text())

    report = convert(bundle, tmp_path / "of", capsys)
    assert "OpenFlamingo released state dict converted" in report
    assert ("-> transformers MptForCausalLM" in report) == remote_code
    model = openflamingo.load(tmp_path / "of").eval()
    assert model.config.cross_attention.every_n_layers == meta["cross_attn_every_n_layers"]
    assert sorted(int(i) for i in model.cross_attn_blocks) == meta["cross_attn_layer_indices"]
    assert (model.special_ids.end_of_chunk, model.special_ids.media, model.special_ids.pad) == (
        meta["tokenizer"]["eoc_token_id"],
        meta["tokenizer"]["media_token_id"],
        meta["tokenizer"]["pad_token_id"],
    )
    images = images_of(reference)

    # an interleaved training-style batch (right padding): tokens, preprocessing and logits
    batch = prepare_inputs(model, meta["forward_texts"], images, padding_side="right")
    assert torch.equal(batch["input_ids"], reference["forward_input_ids"])
    assert torch.equal(batch["attention_mask"], reference["forward_attention_mask"])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == reference["logits"].shape
    assert float((logits - reference["logits"]).abs().max()) <= TOLERANCE

    # few-shot prompts (left padding): greedy generation and each step's logits
    prompts = prepare_inputs(model, meta["gen_prompts"], images, padding_side="left")
    assert torch.equal(prompts["input_ids"], reference["prompt_input_ids"])
    new_tokens = meta["generate"]["max_new_tokens"]
    generated = model.generate(
        **prompts,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(generated.sequences, reference["sequences"])
    step_logits = torch.stack(generated.logits, dim=1)
    assert float((step_logits - reference["step_logits"]).abs().max()) <= TOLERANCE


def test_generate_command_answers_like_openflamingo(tmp_path, capsys):
    """`openflamingo generate` on the converted 9B stand-in: the reference's greedy continuation of the first
    prompt, up to the first step whose top token is <|endofchunk|> (the command stops there; the reference was kept
    going by min_new_tokens, its step logits are the raw ones)."""
    bundle = FIXTURES / "openflamingo_9b"
    meta = json.loads((bundle / "README.json").read_text())
    reference = load_file(bundle / "reference.safetensors")
    convert(bundle, tmp_path / "of", capsys)
    paths = []
    for i, image in enumerate(images_of(reference)[0]):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        image.save(tmp_path / f"{i}.png")
    rc = cli_main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "of"),
            *paths,
            "--prompt",
            meta["gen_prompts"][0],
            "--max-new-tokens",
            str(meta["generate"]["max_new_tokens"]),
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "of" / "tokenizer"))
    top = reference["step_logits"][0].argmax(-1).tolist()
    eoc = meta["tokenizer"]["eoc_token_id"]
    expected = meta["new_tokens"][0][: top.index(eoc) if eoc in top else len(top)]
    assert captured.out.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_the_pad_token_is_the_one_the_tokenizer_files_name(tmp_path):
    """transformers 5's GPTNeoXTokenizer makes up <|padding|> when the files name no pad token (4.x did not): the
    releases' tokenizer names none, and OpenFlamingo added <PAD> to it."""
    from openflamingo.model.build import load_tokenizer

    lm = FIXTURES / "openflamingo_4b" / "lm"
    assert load_tokenizer(lm).pad_token is None
    named = tmp_path / "named"
    shutil.copytree(lm, named, ignore=shutil.ignore_patterns("*.bin"))
    config = json.loads((named / "tokenizer_config.json").read_text())
    (named / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|padding|>"}))
    assert load_tokenizer(named).pad_token == "<|padding|>"
