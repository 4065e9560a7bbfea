"""`openflamingo convert idefics`: a Hub-layout IDEFICS directory becomes an openflamingo checkpoint whose forward and
generate are transformers' IdeficsForVisionText2Text's (tiny random configs built offline, tests/idefics_reference.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.idefics import hub_directory, pixels, prompts
from idefics_reference import (
    reference_generate,
    reference_logits,
)

import openflamingo
from openflamingo.model.convert.idefics import IdeficsError, convert_idefics

CASES = {
    "float gates, a block before every layer": dict(alpha_type="float", cross_layer_interval=1),
    "vector gates, q/k norms, every 2nd layer": dict(
        alpha_type="vector", qk_layer_norms=True, qk_layer_norms_perceiver=True, cross_layer_interval=2
    ),
    "flat config layout, q/k norms in the blocks only": dict(
        alpha_type="float", qk_layer_norms=True, cross_layer_interval=2, layout="flat"
    ),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def converted(request, tmp_path_factory):
    options = dict(CASES[request.param])
    root = tmp_path_factory.mktemp("idefics")
    reference, tokenizer, source = hub_directory(root, **options)
    convert_idefics(source, root / "out")
    return reference, tokenizer, openflamingo.load(root / "out").eval()


def test_logits_equal_transformers_idefics(converted):
    reference, tokenizer, model = converted
    input_ids, attention_mask = prompts(tokenizer)
    images = pixels(2, 2)
    expected = reference_logits(reference, input_ids, images, attention_mask)
    with torch.no_grad():
        ours = model(input_ids, images[:, :, None], attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=0)
    # The images matter: without them the logits are far from IDEFICS' (the gates are not zero).
    with torch.no_grad():
        blind = model(input_ids, torch.zeros_like(images)[:, :, None], attention_mask=attention_mask).logits
    assert (blind[real] - expected[real]).abs().max() > 1e-2


def test_cached_greedy_generation_equals_transformers_idefics(converted):
    reference, tokenizer, model = converted
    input_ids, attention_mask = prompts(tokenizer)
    images = pixels(2, 2)
    expected = reference_generate(reference, input_ids, images, attention_mask, max_new_tokens=12)
    ours = model.generate(
        input_ids, images[:, :, None], attention_mask=attention_mask, max_new_tokens=12, do_sample=False
    )[:, input_ids.shape[1] :]
    assert ours.tolist() == expected.tolist()


def test_strict_conversion_names_what_is_wrong(tmp_path):
    _, _, source = hub_directory(tmp_path)
    config = json.loads((source / "config.json").read_text())

    def refused(match: str) -> None:
        with pytest.raises(ValueError, match=match):  # IdeficsError, or load_strict's for the weights
            convert_idefics(source, tmp_path / "out", overwrite=True)
        assert not (tmp_path / "out").exists()

    (source / "config.json").write_text(json.dumps({**config, "mystery_option": 1}))
    refused("unknown field mystery_option")
    (source / "config.json").write_text(json.dumps({**config, "use_resampler": False}))
    refused("use_resampler")
    (source / "config.json").write_text(json.dumps(config))

    from safetensors.torch import load_file, save_file

    name = "model.gated_cross_attn_layers.0.mlp.up_proj.weight"
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = source / index["weight_map"][name]
    tensors = load_file(shard)
    save_file({**tensors, "model.mystery.weight": torch.zeros(1)}, shard)
    refused("unknown tensor model.mystery.weight")
    save_file({k: v for k, v in tensors.items() if k != name}, shard)
    refused("missing key.*cross_attn_blocks.0.ff.up_proj.weight")
    save_file({**tensors, name: torch.zeros(3, 2)}, shard)
    refused("cross_attn_blocks.0.ff.up_proj.weight has shape")


def test_pickled_weights_are_refused(tmp_path):
    _, _, source = hub_directory(tmp_path, pickle=True)
    with pytest.raises(IdeficsError, match="pickled weights.*pytorch_model.bin"):
        convert_idefics(source, tmp_path / "out")


def test_a_converted_idefics_fine_tunes_with_lora_and_serves_what_generate_answers(tmp_path):
    """convert idefics -> `openflamingo train` (init_from + LoRA on the LM, LLaVA conversations) -> load -> serve."""
    import httpx
    from helpers.data import _png
    from helpers.serve import generate
    from helpers.train import config_of, tiny_run
    from serving import image_part, running_server, settings

    from openflamingo.data.convert import convert
    from openflamingo.train import train

    _, _, source = hub_directory(tmp_path, cross_layer_interval=2)
    convert_idefics(source, tmp_path / "base")
    (tmp_path / "img").mkdir()
    records = []
    for i, colour in enumerate(("red", "blue", "green", "yellow")):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(colour))
        turns = [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": f"It is {colour}."},
        ]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    (tmp_path / "llava.json").write_text(json.dumps(records))
    convert("llava", [str(tmp_path / "llava.json")], tmp_path / "shards", images=tmp_path / "img")

    run = tiny_run(
        tmp_path / "base" / "tokenizer", tmp_path / "run", train={"steps": 40, "lr": 2e-2, "warmup_steps": 0}
    )
    run["model"] = {
        "init_from": str(tmp_path / "base"),
        "lora": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]},
    }
    run["datasets"] = {
        "chat": {
            "kind": "interleaved",
            "path": str(tmp_path / "shards"),
            "batch_size": 2,
            "seq_len": 48,
            "options": {"num_workers": 0, "shuffle_buffer": 1},
        }
    }
    run["data"] = {"loader": "shards"}
    result = train(config_of(run))
    assert result.step == 40 and all(loss == loss for loss in result.losses.values())
    model = openflamingo.load(tmp_path / "run" / "final").eval()
    assert model.config.lora is not None and model.config.cross_attention.feed_forward == "swiglu"
    trained = model.cross_attn_blocks["0"].ff.up_proj.weight
    base = openflamingo.load(tmp_path / "base").cross_attn_blocks["0"].ff.up_proj.weight
    assert not torch.equal(trained, base)  # the blocks trained too

    question = [{"role": "user", "content": [image_part(), {"type": "text", "text": "What colour?"}]}]
    with running_server(model, settings(model)) as (url, _):
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tiny-flamingo", "messages": question, "max_tokens": 6, "temperature": 0},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert answer and answer == generate(model, question, 6), answer


def test_conversion_takes_the_files_tensors_as_weights_instead_of_initialising_its_own(tmp_path, monkeypatch):
    """The model is built with every parameter on the meta device (no random fp32 copy of IDEFICS-80B's 160 GB
    before the weights arrive), then the tensors read from the safetensors files become its parameters, in their
    stored dtype (the Hub's bf16); only the key/value projections, joined from two source tensors, are new. The
    non-persistent buffers (rotary inv_freq, CLIP's position ids) are those of a normally built model."""
    from safetensors.torch import load_file, save_file

    import openflamingo.model.build as build
    import openflamingo.model.checkpoint as checkpoint
    import openflamingo.model.convert.idefics as idefics

    _, _, source = hub_directory(tmp_path, cross_layer_interval=2)
    for shard in source.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(shard).items()}, shard)
    read, built, saved = [], [], []
    original_read, original_build, original_save = (
        idefics.read_idefics_weights,
        build.build_flamingo,
        checkpoint.save_pretrained,
    )

    def read_weights(directory):
        read.append(original_read(directory))
        return read[-1]

    def build_flamingo(config, seed=None):
        model = original_build(config, seed)
        built.append({name: p.device.type for name, p in model.named_parameters()})
        return model

    def save_pretrained(model, *args, **kwargs):
        saved.append(model)
        return original_save(model, *args, **kwargs)

    monkeypatch.setattr(idefics, "read_idefics_weights", read_weights)
    monkeypatch.setattr(build, "build_flamingo", build_flamingo)
    monkeypatch.setattr(checkpoint, "save_pretrained", save_pretrained)
    convert_idefics(source, tmp_path / "out")

    assert set(built[0].values()) == {"meta"}
    from_files = {tensor.data_ptr() for tensor in read[0].values()}
    new = sorted(name for name, p in saved[0].named_parameters() if p.data_ptr() not in from_files)
    assert new and all(name.endswith("attn.to_kv.weight") for name in new), new
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    normally_built = dict(openflamingo.load(tmp_path / "out").named_buffers())
    converted_buffers = dict(saved[0].named_buffers())
    assert converted_buffers.keys() == normally_built.keys() and len(converted_buffers) >= 2
    for name, buffer in converted_buffers.items():
        torch.testing.assert_close(buffer, normally_built[name], atol=0, rtol=0, msg=name)

    monkeypatch.undo()
    from openflamingo.cli import main

    main(
        [
            "convert",
            "idefics",
            str(source),
            str(tmp_path / "fp32"),
            "--dtype",
            "fp32",
            "--prompt-format",
            "instruct",
        ]
    )
    assert {t.dtype for t in load_file(tmp_path / "fp32" / "model.safetensors").values()} == {torch.float32}
    assert openflamingo.load(tmp_path / "fp32").config.prompt_format.stop == ["<end_of_utterance>"]
