"""The README's promises, end to end: packaged backbones build a working model offline; `openflamingo generate`."""

import torch
from helpers.model import tiny_config
from PIL import Image

from openflamingo import (
    CrossAttentionConfig,
    FlamingoConfig,
    PerceiverConfig,
    VisionConfig,
    build_flamingo,
    save_pretrained,
)
from openflamingo.cli import main as cli_main
from openflamingo.model.inputs import prepare_inputs


def test_packaged_backbones_build_a_model_that_trains_and_generates_offline():
    config = FlamingoConfig(
        language_model="smollm2-135m",
        vision=VisionConfig("efficientnet_lite0"),
        perceiver=PerceiverConfig(depth=1, num_latents=4),
        cross_attention=CrossAttentionConfig(every_n_layers=15, gate_init=0.1),
    )
    model = build_flamingo(config, seed=0)
    assert type(model.language_model).__name__ == "LlamaForCausalLM" and len(model.cross_attn_blocks) == 2
    image = Image.new("RGB", (80, 60), (200, 30, 30))
    inputs = prepare_inputs(
        model, ["<image>Question: What colour is it? Answer: red<|endofchunk|>"], [[image]]
    )
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and model.cross_attn_blocks["14"].attn_gate.grad is not None
    prompt = prepare_inputs(model, ["<image>Question: What colour is it? Answer:"], [[image]])
    tokens = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3)
    assert tokens.shape == (1, prompt["input_ids"].shape[1] + 3)


def test_generate_command_answers_from_a_saved_model(tokenizer_dir, tmp_path, capsys):
    model = build_flamingo(tiny_config(tokenizer_dir), seed=0)
    save_pretrained(model, tmp_path / "model")
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "blue.png")
    rc = cli_main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "model"),
            "--image",
            str(tmp_path / "blue.png"),
            "--prompt",
            "<image>Question: what is it? Answer:",
            "--max-new-tokens",
            "4",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert len(captured.out.strip().splitlines()) == 1


def test_generate_command_reports_image_token_mismatch_in_one_line(tokenizer_dir, tmp_path, capsys):
    save_pretrained(build_flamingo(tiny_config(tokenizer_dir), seed=0), tmp_path / "model")
    rc = cli_main(["generate", "--checkpoint", str(tmp_path / "model"), "--prompt", "<image>no image given"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("openflamingo generate: error:") and len(err.splitlines()) == 1
    assert "input_ids contain <image> tokens but no images were given" in err
