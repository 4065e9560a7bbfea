"""An IDEFICS is an ordinary openflamingo model everywhere: the few-shot eval suite runs on a converted one in both
of its prompt formats, writing IDEFICS' own tokens, and FSDP2 on 2 processes trains IDEFICS-shaped blocks (placed
before the first layer of each group) exactly as one process does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers.eval import TASK_FILES, F, cli
from helpers.idefics import hub_directory
from helpers.train import (
    FINE_TUNED_LM,
    assert_same_weights,
    config_of,
    logged_losses,
    one_thread,  # noqa: F401 (an autouse fixture: tiny models run on one thread)
    tiny_run,
    torchrun,
)

import openflamingo
from openflamingo.eval import DataPaths, EvalConfig, prepare, run
from openflamingo.eval.runner import tokenize_answers
from openflamingo.eval.tasks import get_task
from openflamingo.model.convert.idefics import convert_idefics
from openflamingo.train import train
from openflamingo.train.config import to_toml

IMAGE = "<fake_token_around_image><image><fake_token_around_image>"
END_OF_UTTERANCE = "<end_of_utterance>"
SHOTS = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny IDEFICS converted twice: with OpenFlamingo's few-shot format (the base models') and -instruct's."""
    root = tmp_path_factory.mktemp("idefics")
    _, _, source = hub_directory(root, cross_layer_interval=2)
    for name in ("base", "instruct"):
        convert_idefics(source, root / name, instruct=name == "instruct")
    return {name: root / name for name in ("base", "instruct")}


@pytest.mark.parametrize("task", ["vqav2", "hateful_memes"])  # generation, rank classification
@pytest.mark.parametrize("prompt_format", ["base", "instruct"])
def test_the_eval_suite_runs_few_shot_on_idefics_in_its_own_tokens(
    checkpoints, tmp_path, task, prompt_format
):
    out = tmp_path / "out"
    cli("eval", "--checkpoint", checkpoints[prompt_format], "--task", task, "--shots", SHOTS, "--trials", 1,
        "--num-samples", 3, "--batch-size", 3, "--max-new-tokens", 4, "--output-dir", out, "--device", "cpu",
        "--no-progress", *TASK_FILES[task])  # fmt: skip
    results = json.loads((out / f"results_{task}.json").read_text())
    metric = results["configs"][task]["task"]["metric"]
    entry = results["results"][f"{task}_{SHOTS}shot"]
    assert math.isfinite(entry[f"{metric},none"])
    records = [json.loads(line) for line in (out / f"samples_{task}_{SHOTS}shot_trial0.jsonl").open()]
    assert len(records) == 3
    for record in records:
        prompt, images = record["prompt"], SHOTS + 1
        assert prompt.count(IMAGE) == prompt.count("<image>") == len(record["images"]) == images
        assert "<|endofchunk|>" not in prompt
        if prompt_format == "base":  # demonstrations close with IDEFICS' end of sequence, as its documents
            assert prompt.count("</s>") == SHOTS and "User:" not in prompt
        else:  # one exchange per example, in the -instruct models' dialogue format
            assert prompt.startswith("User:" + IMAGE) and prompt.endswith(f"{END_OF_UTTERANCE}\nAssistant:")
            assert prompt.count("User:") == images and prompt.count(END_OF_UTTERANCE) == SHOTS * 2 + 1


def scripted_answers(model, text: str) -> None:
    """Make `model` generate `text` after any prompt: a large logit for its next token at each decoding step."""
    tokens = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    generated = []  # tokens generated so far in this `generate` (the prompt's forward starts it)

    def push_next_token(module, args, kwargs, output) -> None:
        new = kwargs["inputs_embeds"]  # Flamingo embeds its own tokens before the LM runs
        if new.shape[1] > 1:  # the prompt: a new generation starts
            generated.clear()
        if len(generated) < len(tokens):
            output.logits[:, -1, tokens[len(generated)]] += 1e4
        generated.append(None)

    model.language_model.register_forward_hook(push_next_token, with_kwargs=True)


def test_instruct_answers_end_at_end_of_utterance_though_it_spans_several_tokens(checkpoints, tmp_path):
    """<end_of_utterance> is text, not a token, in IDEFICS' vocabulary: generation stops after it (HF stop
    strings) and the eval's answer is what comes before it."""
    model = openflamingo.load(checkpoints["instruct"]).eval()
    assert len(model.tokenizer(END_OF_UTTERANCE, add_special_tokens=False)["input_ids"]) > 1
    scripted_answers(model, f" net{END_OF_UTTERANCE}\nUser: and then")
    paths = DataPaths(
        questions=F / "vqa/val_questions.json", annotations=F / "vqa/val_annotations.json", images=F / "vqa/val",
        train_questions=F / "vqa/train_questions.json", train_annotations=F / "vqa/train_annotations.json",
        train_images=F / "vqa/train2014",
    )  # fmt: skip
    prepared = prepare(
        EvalConfig("vqav2", paths, shots=[SHOTS], trials=1, num_samples=3, batch_size=3, num_beams=1,
                   max_new_tokens=64, output_dir=tmp_path, device="cpu", progress=False)
    )  # fmt: skip
    run(model, prepared)
    records = [json.loads(line) for line in (tmp_path / f"samples_vqav2_{SHOTS}shot_trial0.jsonl").open()]
    for record in records:
        assert record["resps"][0].endswith(f" net{END_OF_UTTERANCE}")  # stopped right after the stop string
        assert record["prediction"] == " net"


def test_instruct_class_names_are_scored_after_the_space_its_answers_start_with(checkpoints):
    """The -instruct prompt ends at "Assistant:" and its answers are written "Assistant: yes", so the ranked
    continuation is " yes" (the task template's own "Answer:{answer}" has no space)."""
    model = openflamingo.load(checkpoints["instruct"])
    expected = model.tokenizer([" no", " yes"], add_special_tokens=False)["input_ids"]
    assert tokenize_answers(model, get_task("hateful_memes"), ["no", "yes"]) == expected


IDEFICS_BLOCKS = {
    "vision": {"kind": "hf_clip", "keep_cls": True, "resize": "squash"},
    # No q/k norms in the perceiver (nor in the 9B/80B presets): its key norm's bias shifts every key of a query's
    # softmax alike, so its gradient is zero up to rounding, which AdamW scales to steps of any sign and the two runs'
    # summation orders then disagree on. The blocks' q/k norms are RMSNorms, without bias.
    "perceiver": {"depth": 1, "num_latents": 4, "heads": 2, "dim_head": 8, "activation": "relu"},
    "cross_attention": {
        "every_n_layers": 2,
        "group_position": "first",  # blocks before layers 0 and 2 (OpenFlamingo's: before 1 and 3)
        "heads": 2,
        "dim_head": 8,
        "feed_forward": "swiglu",
        "ff_dim": 48,
        "norm": "rmsnorm",
        "norm_eps": 1e-6,
        "qk_norm": True,
        "gate": "vector",
        "gate_init": 0.5,
        "media_ends_at_eos": True,
    },
    "special_tokens": {
        "media": "<image>",
        "end_of_chunk": "</s>",
        "added": ["<fake_token_around_image>", "<image>"],
        "around_media": "<fake_token_around_image>",
    },
}


def test_fsdp2_on_two_processes_trains_idefics_shaped_blocks_as_one_process_does(tokenizer_dir, tmp_path):
    """One FSDP2 unit per decoder layer and the block before it, with IDEFICS' placement (the first layer of each
    group) and insides, LoRA and a fully trained LM layer besides: the same losses and weights as one process
    with the same global batch."""
    run = tiny_run(tokenizer_dir, tmp_path / "single", train={"grad_accum": 2})
    vision = {**run["model"]["vision"], **IDEFICS_BLOCKS["vision"]}
    run["model"].update(IDEFICS_BLOCKS, vision=vision, **FINE_TUNED_LM)
    result = train(config_of(run))
    assert sorted(result.model.cross_attn_blocks) == ["0", "2"]
    config_path = tmp_path / "run.toml"
    config_path.write_text(to_toml(run))
    torchrun(config_path, "--parallel.mode", "fsdp", "--parallel.activation_checkpointing", "true",
             "--train.output_dir", str(tmp_path / "fsdp"))  # fmt: skip
    assert logged_losses(tmp_path / "fsdp") == pytest.approx(result.losses, rel=1e-5)
    assert_same_weights(tmp_path / "fsdp", tmp_path / "single")
