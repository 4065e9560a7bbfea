"""LoRA on the gated cross-attention blocks (`[model.lora] cross_attention_modules`): what trains, the blocks' own
peft adapter directory in a checkpoint, training and resume, and an IDEFICS conversion fine-tuned that way exported
with `openflamingo export --merge-lora`."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers.model import TEXTS, batch, perturbed, tiny_config
from helpers.train import config_of, one_thread, tiny_run  # noqa: F401  (one_thread: the autouse fixture)
from safetensors.torch import load_file, save_file
from torch import nn

import openflamingo
from openflamingo import build_flamingo, save_pretrained
from openflamingo.cli import main as cli_main
from openflamingo.config_loader import from_dict
from openflamingo.model.cross_attention import CrossAttentionConfig, GatedCrossAttentionBlock
from openflamingo.model.lora import LoraSettings, inject_cross_attention_lora

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

GELU_BLOCK_LINEARS = ["fc1", "fc2", "to_kv", "to_out", "to_q"]
BLOCKS_ONLY = LoraSettings(rank=4, alpha=8.0, target_modules=[], cross_attention_modules=GELU_BLOCK_LINEARS)
LM_AND_BLOCKS = dataclasses.replace(BLOCKS_ONLY, target_modules=["q_proj", "v_proj"])
# What else trains in a block whose every linear layer has LoRA: its gates and norms, a few vectors each.
GATES_AND_NORMS = (
    "attn_gate",
    "ff_gate",
    "attn.norm.weight",
    "attn.norm.bias",
    "ff.norm.weight",
    "ff.norm.bias",
)
ROOT = Path(__file__).parent.parent
FINE_TUNING = ROOT / "docs" / "fine-tuning.md"


def with_lora(tokenizer_dir, lora: LoraSettings):
    return dataclasses.replace(tiny_config(tokenizer_dir), lora=lora)


def built(config):
    """A model whose every weight follows from seed 0 (build_flamingo's seed covers the new parts only, not an LM
    built from a config)."""
    torch.manual_seed(0)
    return build_flamingo(config, seed=0)


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_block_lora_trains_adapters_gates_and_norms_and_starts_as_the_model_without_it(tokenizer_dir):
    model = built(with_lora(tokenizer_dir, BLOCKS_ONLY)).eval()
    blocks = {n for n in trainable(model) if n.startswith("cross_attn_blocks.")}
    assert {n for n in blocks if ".lora_" not in n} == {
        f"cross_attn_blocks.{i}.{name}" for i in model.cross_attn_blocks for name in GATES_AND_NORMS
    }
    frozen_bases = [n for n, p in model.named_parameters() if ".base_layer." in n]
    assert len(frozen_bases) == len(GELU_BLOCK_LINEARS) * len(model.cross_attn_blocks)
    assert not trainable(model) & set(frozen_bases)
    # target_modules = []: the LM stays frozen.
    assert not any(n.startswith("language_model.") for n in trainable(model))
    assert not model.config.adapts_language_model
    # The adapters' B matrices start at zero: the same logits as the model without LoRA, to the bit.
    plain = built(tiny_config(tokenizer_dir)).eval()
    inputs = batch(model, TEXTS, [2, 1])
    assert torch.equal(model(**inputs).logits, plain(**inputs).logits)


def test_block_layers_not_listed_keep_training_in_full(tokenizer_dir):
    model = build_flamingo(
        with_lora(tokenizer_dir, dataclasses.replace(BLOCKS_ONLY, cross_attention_modules=["to_q"]))
    )
    names = trainable(model)
    assert "cross_attn_blocks.1.attn.to_q.base_layer.weight" not in names
    assert "cross_attn_blocks.1.attn.to_q.lora_A.default.weight" in names
    assert {"cross_attn_blocks.1.attn.to_kv.weight", "cross_attn_blocks.1.ff.fc1.weight"} <= names


def test_lora_settings_refuse_no_targets_and_block_layers_the_blocks_lack_in_one_line(tokenizer_dir):
    with pytest.raises(
        ValueError, match="lora.target_modules and lora.cross_attention_modules are both empty"
    ):
        LoraSettings(target_modules=[], cross_attention_modules=[])
    swiglu_names = dataclasses.replace(BLOCKS_ONLY, cross_attention_modules=["to_q", "gate_proj"])
    with pytest.raises(ValueError) as error:
        build_flamingo(with_lora(tokenizer_dir, swiglu_names))
    assert str(error.value) == (
        "lora.cross_attention_modules: 'gate_proj' is not a linear layer of these cross-attention blocks; "
        f"theirs: {GELU_BLOCK_LINEARS}"
    )
    # LoRA on the blocks only leaves the LM free to train in full; LoRA on the LM does not.
    dataclasses.replace(with_lora(tokenizer_dir, BLOCKS_ONLY), train_language_model=True)
    with pytest.raises(
        ValueError, match="train_language_model trains the whole LM; drop lora.target_modules"
    ):
        dataclasses.replace(with_lora(tokenizer_dir, LM_AND_BLOCKS), train_language_model=True)


@pytest.fixture(scope="module")
def saved(tokenizer_dir, tmp_path_factory):
    """A model with LoRA on the LM and the blocks, every trainable tensor moved from its init, saved."""
    model = perturbed(built(with_lora(tokenizer_dir, LM_AND_BLOCKS))).eval()
    directory = tmp_path_factory.mktemp("lora") / "saved"
    save_pretrained(model, directory)
    return model, directory


def test_block_adapters_round_trip_through_their_own_peft_adapter_directory(saved, tokenizer_dir):
    import peft

    model, directory = saved
    blocks_adapter = load_file(directory / "cross_attention_adapter" / "adapter_model.safetensors")
    assert "base_model.model.1.attn.to_q.lora_A.weight" in blocks_adapter  # relative to cross_attn_blocks
    assert len(blocks_adapter) == 2 * len(GELU_BLOCK_LINEARS) * len(model.cross_attn_blocks)
    config = json.loads((directory / "cross_attention_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == GELU_BLOCK_LINEARS
    lm_adapter = load_file(directory / "adapter" / "adapter_model.safetensors")
    assert lm_adapter and all(k.startswith("base_model.model.model.layers.") for k in lm_adapter)
    stored = load_file(directory / "model.safetensors")
    assert "cross_attn_blocks.1.attn.to_q.weight" in stored  # base weights under their plain names
    assert not any(".lora_" in k or "base_layer" in k for k in stored)

    reloaded = openflamingo.load(directory).eval()
    inputs = batch(model, TEXTS, [2, 1])
    assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)

    # Both directories are plain peft adapters: PeftModel.from_pretrained reads each into the module it adapts.
    plain = built(tiny_config(tokenizer_dir))
    for module, adapter, prefix in (
        (plain.cross_attn_blocks, "cross_attention_adapter", "cross_attn_blocks."),
        (plain.language_model, "adapter", "language_model."),
    ):
        by_peft = peft.PeftModel.from_pretrained(module, directory / adapter).state_dict()
        ours = {k: v for k, v in model.state_dict().items() if k.startswith(prefix) and ".lora_" in k}
        assert ours and all(
            torch.equal(by_peft["base_model.model." + k[len(prefix) :]], v) for k, v in ours.items()
        )


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "no file"])
def test_a_bad_block_adapter_file_is_a_one_line_error_naming_it(saved, tmp_path, change):
    _, directory = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    path = copy / "cross_attention_adapter" / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.1.ff.fc2.lora_B.weight"
    if change == "missing":
        del state[key]
    elif change == "extra":
        key = "base_model.model.1.ff.fc3.lora_B.weight"
        state[key] = torch.zeros(2)
    elif change == "shape":
        state[key] = torch.zeros(3, 3)
    save_file(state, path)
    if change == "no file":
        path.unlink()
        key = "adapter_model.safetensors not found"
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        openflamingo.load(copy)
    message = str(error.value)
    assert str(path) in message and key in message and "\n" not in message


def test_block_lora_trains_and_resumes_exactly(tokenizer_dir, tmp_path):

    from openflamingo.train import train

    run = tiny_run(tokenizer_dir, tmp_path, checkpoint={"every": 2, "keep": 5, "export": False})
    run["model"]["lora"] = dataclasses.asdict(BLOCKS_ONLY)
    first = train(config_of(run))
    adapters = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}
    block_b = [n for n in adapters if n.startswith("cross_attn_blocks.") and ".lora_B." in n]
    # The blocks' B matrices start at zero: the optimizer stepped them.
    assert block_b and all(adapters[n].abs().max() > 0 for n in block_b)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000004")
    resumed = train(config_of(run))
    assert resumed.resumed_from.name == "step_00000002" and sorted(resumed.losses) == [3, 4]
    assert resumed.losses == {step: first.losses[step] for step in (3, 4)}
    for name, param in resumed.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, adapters[name]), name


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_fsdp2_with_activation_checkpointing_trains_block_lora_like_one_process(tokenizer_dir, tmp_path):
    """2 processes (gloo), each with half the global batch: the losses and every saved tensor of the single-process
    run, adapters of the LM and of the blocks included (frozen bases and adapters share the blocks' FSDP units)."""
    from helpers.train import logged_losses, torchrun

    from openflamingo.train import train
    from openflamingo.train.config import to_toml

    run = tiny_run(tokenizer_dir, tmp_path / "single", train={"grad_accum": 2, "steps": 3})
    run["model"]["lora"] = dataclasses.asdict(LM_AND_BLOCKS)
    single = train(config_of(run))
    (tmp_path / "run.toml").write_text(to_toml(run))
    fsdp = ["--parallel.mode", "fsdp", "--parallel.activation_checkpointing", "true"]
    torchrun(tmp_path / "run.toml", *fsdp, "--train.output_dir", str(tmp_path / "fsdp"))
    assert logged_losses(tmp_path / "fsdp") == pytest.approx(single.losses, rel=1e-5)
    for file in (
        "model.safetensors",
        "adapter/adapter_model.safetensors",
        "cross_attention_adapter/adapter_model.safetensors",
    ):
        ours, theirs = (load_file(tmp_path / run_dir / "final" / file) for run_dir in ("fsdp", "single"))
        assert ours.keys() == theirs.keys()
        for key in ours:
            # AdamW divides each gradient by its running RMS, so the summation-order rounding of a near-zero gradient
            # (one process or two) can move its element by a fraction of a step: seen 2e-5 in 1 of 1024 perceiver
            # weights under transformers 4.57. 1e-4 is 1/30 of one step at lr 3e-3.
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4, msg=key)


def test_an_idefics_conversion_fine_tuned_with_lora_on_lm_and_blocks_exports_merged_with_the_same_outputs(
    tmp_path, capsys
):
    """convert idefics -> `openflamingo train` (init_from, LoRA on the LM and on every block linear layer)
    -> `openflamingo export --merge-lora` -> load: the logits and greedy tokens of the LoRA model."""
    from helpers.idefics import hub_directory, pixels, prompts

    from openflamingo.model.convert.idefics import convert_idefics
    from openflamingo.train import train

    _, tokenizer, source = hub_directory(tmp_path, cross_layer_interval=2)
    convert_idefics(source, tmp_path / "base")
    run = tiny_run(
        tmp_path / "base" / "tokenizer",
        tmp_path / "run",
        train={"steps": 3, "lr": 2e-2, "warmup_steps": 0},
        checkpoint={"every": 3},
    )
    run["model"] = {
        "init_from": str(tmp_path / "base"),
        "lora": {
            "rank": 2,
            "alpha": 4.0,
            "target_modules": ["q_proj", "v_proj"],
            "cross_attention_modules": ["to_q", "to_kv", "to_out", "gate_proj", "up_proj", "down_proj"],
        },
    }
    result = train(config_of(run))
    lora_b = {n: p for n, p in result.model.named_parameters() if ".lora_B." in n}
    assert any(n.startswith("cross_attn_blocks.") for n in lora_b)
    assert all(p.abs().max() > 0 for p in lora_b.values())  # LM and block adapters both trained
    base = openflamingo.load(tmp_path / "base")
    block = result.model.cross_attn_blocks["0"]
    assert torch.equal(block.ff.up_proj.base_layer.weight, base.cross_attn_blocks["0"].ff.up_proj.weight)
    assert not torch.equal(block.attn_gate, base.cross_attn_blocks["0"].attn_gate)  # the gates train in full

    assert (
        cli_main(["export", "--merge-lora", str(tmp_path / "run" / "final"), str(tmp_path / "merged")]) == 0
    )
    # q and v in each of the LM's 4 layers; the 6 linear layers of each of the 2 blocks.
    assert "merged 8 LoRA adapters into the language model and 12 into the cross-attention blocks" in (
        capsys.readouterr().out
    )
    assert not (tmp_path / "merged" / "adapter").exists()
    assert not (tmp_path / "merged" / "cross_attention_adapter").exists()
    lora_model = openflamingo.load(tmp_path / "run" / "final").eval()
    merged = openflamingo.load(tmp_path / "merged").eval()
    assert merged.config.lora is None and not any(".lora_" in n for n, _ in merged.named_parameters())

    input_ids, attention_mask = prompts(tokenizer)
    images = pixels(2, 2)[:, :, None]
    with torch.no_grad():
        expected, ours, before = (
            model(input_ids, images, attention_mask=attention_mask).logits
            for model in (lora_model, merged, base)
        )
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=0)
    assert (expected[real] - before[real]).abs().max() > 1e-3  # the fine-tune changed what the model computes
    greedy = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    assert (
        merged.generate(input_ids, images, **greedy).tolist()
        == lora_model.generate(input_ids, images, **greedy).tolist()
    )


def test_the_documented_lora_example_fits_the_demo_model_it_starts_from():
    """docs/fine-tuning.md's example (init_from = runs/demo/final) names layers the demo's blocks have."""
    examples = re.findall(r"```toml\n(.*?)```", FINE_TUNING.read_text(), flags=re.S)
    tables = [tomllib.loads(e)["model"]["lora"] for e in examples if "cross_attention_modules" in e]
    assert tables
    demo = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())["model"]["cross_attention"]
    for table in tables:
        settings = from_dict(LoraSettings, table, "lora")
        blocks = nn.ModuleDict({"0": GatedCrossAttentionBlock(16, 8, CrossAttentionConfig(**demo))})
        inject_cross_attention_lora(blocks, settings)
