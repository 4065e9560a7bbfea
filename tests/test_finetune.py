"""Fine-tuning: starting from saved weights, LoRA and partly unfrozen LMs, and their checkpoints."""

import dataclasses
import json

import pytest
import torch
from helpers.model import TEXTS, batch, perturbed, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import openflamingo
from openflamingo import build_flamingo, build_or_load, save_pretrained
from openflamingo.model.checkpoint import init_config, load_strict
from openflamingo.model.lora import LoraSettings, merge_lora

LORA = LoraSettings(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture()
def saved(tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    model = perturbed(build_flamingo(tiny_config(tokenizer_dir), seed=0)).eval()
    save_pretrained(model, tmp_path / "base")
    return model, tmp_path / "base"


def recipe_model(directory, **fields) -> dict:
    return {"init_from": str(directory), **fields}


def test_init_from_loads_every_weight_and_then_trains_like_a_hand_loaded_model(saved, tokenizer_dir):
    base, directory = saved
    config = openflamingo.FlamingoConfig.from_dict(init_config(recipe_model(directory)))
    started = build_or_load(config, seed=1)
    by_hand = build_flamingo(tiny_config(tokenizer_dir), seed=1)
    state = load_file(directory / "model.safetensors")
    load_strict(by_hand, state, sorted(state), source="by hand")
    inputs = batch(base, TEXTS, [2, 1])
    for model in (started, by_hand):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    assert started.config.init_from is None  # a new run: the weights are in its own checkpoints
    started_state, hand_state = started.state_dict(), by_hand.state_dict()
    assert started_state.keys() == hand_state.keys()
    assert all(torch.equal(started_state[k], hand_state[k]) for k in hand_state)


def test_build_flamingo_refuses_init_from_and_names_build_or_load(saved):
    _, directory = saved
    config = openflamingo.FlamingoConfig.from_dict(init_config(recipe_model(directory)))
    with pytest.raises(ValueError, match="build_flamingo builds fresh models.*build_or_load"):
        build_flamingo(config)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_init_from_refuses_a_checkpoint_that_does_not_load_completely(saved, change):
    _, directory = saved
    state = load_file(directory / "model.safetensors")
    if change == "missing":
        key = "perceiver.latents"
        del state[key]
    elif change == "extra":
        key = "perceiver.surplus"
        state[key] = torch.zeros(2)
    else:
        key = "perceiver.latents"
        state[key] = torch.zeros(3, 3)
    save_file(state, directory / "model.safetensors")
    config = openflamingo.FlamingoConfig.from_dict(init_config(recipe_model(directory)))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_or_load(config)


def test_init_from_names_the_architecture_field_that_differs(saved):
    _, directory = saved
    with pytest.raises(
        ValueError, match=r"model\.perceiver\.num_latents: the recipe has 8 but init_from .* 4"
    ):
        init_config(recipe_model(directory, perceiver={"num_latents": 8}))
    with pytest.raises(FileNotFoundError, match="model.init_from"):
        init_config(recipe_model(directory / "nowhere"))
    agreed = init_config(recipe_model(directory, perceiver={"num_latents": 4}, lora=dataclasses.asdict(LORA)))
    assert agreed["lora"]["rank"] == 4 and agreed["perceiver"]["num_latents"] == 4


def test_lora_trains_adapters_only_and_round_trips_through_its_peft_files(tokenizer_dir, tmp_path):
    config = dataclasses.replace(tiny_config(tokenizer_dir), lora=LORA)
    model = perturbed(build_flamingo(config, seed=0)).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)
    assert all(
        n.startswith(("perceiver.", "cross_attn_blocks.", "added_tokens.")) or ".lora_" in n
        for n in trainable
    )
    save_pretrained(model, tmp_path / "lora")
    adapter = load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(k.startswith("base_model.model.") and ".lora_" in k for k in adapter)
    assert json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not any(
        ".lora_" in k or "base_layer" in k for k in load_file(tmp_path / "lora" / "model.safetensors")
    )
    inputs = batch(model, TEXTS, [2, 1])
    reloaded = openflamingo.load(tmp_path / "lora").eval()
    assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_merged_lora_gives_the_same_logits(tokenizer_dir, tmp_path):
    config = dataclasses.replace(tiny_config(tokenizer_dir), lora=LORA)
    model = perturbed(build_flamingo(config, seed=0)).eval()
    inputs = batch(model, TEXTS, [2, 1])
    before = model(**inputs).logits
    assert merge_lora(model.language_model) == 2 * 4  # q and v in each of 4 layers
    after = model(**inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # fp32: W + BA folded, then one matmul


def test_lora_refuses_modules_flamingo_hooks_or_the_lm_lacks(tokenizer_dir):
    with pytest.raises(ValueError, match="'lm_head' cannot take LoRA"):
        LoraSettings(target_modules=["lm_head"])
    config = dataclasses.replace(
        tiny_config(tokenizer_dir), lora=LoraSettings(target_modules=["query_key_value"])
    )
    with pytest.raises(ValueError, match="'query_key_value' is not a module of this LM"):
        build_flamingo(config)


def test_unfrozen_layers_train_and_only_they_are_stored(tokenizer_dir, tmp_path):
    config = dataclasses.replace(tiny_config(tokenizer_dir), train_language_model_layers=[1])
    model = build_flamingo(config, seed=0)
    lm_trainable = {
        n for n, p in model.named_parameters() if p.requires_grad and n.startswith("language_model.")
    }
    assert lm_trainable and all(n.startswith("language_model.model.layers.1.") for n in lm_trainable)
    model = perturbed(model).eval()
    # Backbones referenced by path: only layer 1 of the LM is in the checkpoint.
    model.language_model.save_pretrained(tmp_path / "lm")
    model.tokenizer.save_pretrained(tmp_path / "lm")
    model.config = dataclasses.replace(
        model.config, language_model=str(tmp_path / "lm"), language_model_config=None
    )
    with torch.no_grad():
        model.language_model.model.layers[1].mlp.up_proj.weight.add_(1.0)  # differs from the saved LM
    save_pretrained(model, tmp_path / "ckpt")
    stored = {
        k for k in load_file(tmp_path / "ckpt" / "model.safetensors") if k.startswith("language_model.")
    }
    assert stored and all(k.startswith("language_model.model.layers.1.") for k in stored)
    inputs = batch(model, TEXTS, [2, 1])
    assert torch.equal(model(**inputs).logits, openflamingo.load(tmp_path / "ckpt").eval()(**inputs).logits)
    with pytest.raises(ValueError, match="trained LM layers \\[1\\]"):
        init_config(recipe_model(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="out of range for a 4-layer LM"):
        build_flamingo(dataclasses.replace(tiny_config(tokenizer_dir), train_language_model_layers=[4]))


def test_export_merge_lora_gives_a_plain_checkpoint_with_the_same_logits(tokenizer_dir, tmp_path):
    from openflamingo.cli import main

    config = dataclasses.replace(tiny_config(tokenizer_dir), lora=LORA)
    model = perturbed(build_flamingo(config, seed=0)).eval()
    save_pretrained(model, tmp_path / "lora")
    assert main(["export", str(tmp_path / "lora"), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert not (tmp_path / "merged" / "adapter").exists()
    merged = openflamingo.load(tmp_path / "merged").eval()
    assert merged.config.lora is None
    inputs = batch(model, TEXTS, [2, 1])
    torch.testing.assert_close(merged(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)
    assert main(["export", str(tmp_path / "merged"), str(tmp_path / "again"), "--merge-lora"]) == 2


def test_a_fine_tuning_run_starts_from_saved_weights_and_records_its_chat_format(tokenizer_dir, tmp_path):
    """init_from + LLaVA conversations in a chat template + LoRA, through `openflamingo train`, then generate."""
    from helpers.data import CHATML, _png
    from helpers.train import tiny_run

    from openflamingo.cli import main
    from openflamingo.data.convert import convert

    chat_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))  # an instruct LM's: ChatML turns
    chat_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat_tokenizer.chat_template = CHATML
    chat_tokenizer.eos_token = "<|im_end|>"
    chat_tokenizer.save_pretrained(tmp_path / "chat-tokenizer")
    save_pretrained(build_flamingo(tiny_config(tmp_path / "chat-tokenizer"), seed=0), tmp_path / "base")
    (tmp_path / "img").mkdir()
    records = []
    for i, colour in enumerate(("red", "blue", "green", "yellow")):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(colour))
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour?"},
                    {"from": "gpt", "value": f"It is {colour}."},
                ],
            }
        )
    (tmp_path / "llava.json").write_text(json.dumps(records))
    convert("llava", [str(tmp_path / "llava.json")], tmp_path / "shards", images=tmp_path / "img")

    run = tiny_run(tokenizer_dir, tmp_path / "run", train={"steps": 3, "lr": 1e-2, "warmup_steps": 0})
    run["model"] = {
        "init_from": str(tmp_path / "base"),
        "prompt_format": {"kind": "chat", "system": "Be brief."},
        "lora": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]},
    }
    run["datasets"] = {
        "chat": {"kind": "interleaved", "path": str(tmp_path / "shards"), "batch_size": 2, "seq_len": 48}
    }
    run["data"] = {"loader": "shards"}
    run["datasets"]["chat"]["options"] = {"num_workers": 0, "shuffle_buffer": 1}
    from helpers.train import config_of

    from openflamingo.train import train

    result = train(config_of(run))
    assert result.step == 3 and all(loss == loss for loss in result.losses.values())
    final = openflamingo.load(tmp_path / "run" / "final")
    assert final.config.prompt_format.kind == "chat" and final.config.lora is not None
    assert final.config.init_from is None and (tmp_path / "run" / "final" / "adapter").is_dir()
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path / "run" / "final"),
                "--image",
                str(tmp_path / "img" / "0.png"),
                "--question",
                "What colour?",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
