"""Numerical parity with OpenFlamingo 2.0.1 on bundles written by its own code (see tools/parity/README.md).

    python tools/parity/check.py DIR [DIR ...]

For each bundle: build our model from the bundle's LM config, tokenizer and open_clip config, load the OpenFlamingo
state dict through the converter, then compare logits, loss, gradients of the trainable parameters and greedy
generation. Prints one JSON line per bundle; exits 1 when any bundle is out of tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from openflamingo import CrossAttentionConfig, FlamingoConfig, PerceiverConfig, VisionConfig, build_flamingo
from openflamingo.model.convert.openflamingo import (
    convert_open_flamingo_state_dict,
    load_open_flamingo_state_dict,
)

TOLERANCE = {
    "max_abs_logit_diff": 1e-4,
    "loss_abs_diff": 1e-4,
    "max_abs_grad_diff": 1e-4,
    "max_abs_step_logit_diff": 1e-4,
}


def flamingo_config(bundle: Path, meta: dict) -> FlamingoConfig:
    build, hparams = meta["build"], meta["flamingo_fixed_hparams"]
    lm_config = json.loads((bundle / "lm_config" / "config.json").read_text())
    # OpenFlamingo resized the LM to the tokenizer; our LM keeps its own vocabulary and adds Flamingo's tokens.
    lm_config["vocab_size"] = min(build["media_token_id"], build["eoc_token_id"], build["pad_token_id"])
    attn_config = lm_config.get("attn_config")
    if isinstance(attn_config, dict) and attn_config.get("attn_pdrop") == 0:
        attn_config["attn_pdrop"] = (
            0  # transformers 5 types MPT's attn_pdrop as int and rejects the 4.x float 0.0
        )
    perceiver, cross = hparams["perceiver"], hparams["gated_cross_attn"]
    return FlamingoConfig(
        language_model_config=lm_config,
        tokenizer=str(bundle / "tokenizer"),
        vision=VisionConfig("open_clip", config=json.loads((bundle / "open_clip_config.json").read_text())),
        perceiver=PerceiverConfig(
            depth=perceiver["depth"],
            num_latents=perceiver["num_latents"],
            heads=perceiver["heads"],
            dim_head=perceiver["dim_head"],
            ff_mult=perceiver["ff_mult"],
            max_num_frames=perceiver["max_num_frames"],
        ),
        cross_attention=CrossAttentionConfig(
            every_n_layers=build["cross_attn_every_n_layers"],
            heads=cross["heads"],
            dim_head=cross["dim_head"],
            ff_mult=cross["ff_mult"],
            only_attend_immediate_media=cross["only_attend_immediate_media"],
        ),
        decoder_layers_path=build["decoder_layers_attr_name"],
    )


def check_bundle(bundle: Path) -> dict:
    meta = json.loads((bundle / "config.json").read_text())
    torch.manual_seed(0)
    model = build_flamingo(flamingo_config(bundle, meta))
    load_open_flamingo_state_dict(model, load_file(bundle / "state_dict.safetensors"))
    model.eval()

    inputs, outputs = load_file(bundle / "inputs.safetensors"), load_file(bundle / "outputs.safetensors")
    media_counts = (inputs["lang_x"] == model.special_ids.media).sum(1)
    out = model(
        input_ids=inputs["lang_x"],
        images=inputs["vision_x"],
        attention_mask=inputs["attention_mask"],
        labels=inputs["labels"],
        num_images=media_counts,
    )
    out.loss.backward()
    expected_grads, _ = convert_open_flamingo_state_dict(load_file(bundle / "grads.safetensors"), model)
    params = dict(model.named_parameters())
    grad_diffs = {
        name: float((params[name].grad - grad).abs().max())
        for name, grad in expected_grads.items()
        if params[name].requires_grad
    }

    # Which weights generated: bundles say so in generate_kwargs["weights"]; the first bundle format did not, and
    # generated after its one training step, with the result in after_step.safetensors.
    generated_before_step = meta["generate_kwargs"].get("weights", "").startswith("state_dict")
    if not generated_before_step and (bundle / "after_step.safetensors").is_file():
        load_open_flamingo_state_dict(model, load_file(bundle / "after_step.safetensors"))
    gen = load_file(bundle / "generate.safetensors")
    new_tokens = gen["sequences"].shape[1] - gen["lang_x"].shape[1]
    generated = model.generate(
        input_ids=gen["lang_x"],
        images=gen["vision_x"],
        attention_mask=gen["attention_mask"],
        num_images=(gen["lang_x"] == model.special_ids.media).sum(1),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    step_logits = torch.stack(generated.logits, dim=1)
    result = {
        "bundle": str(bundle),
        "lm_class": type(model.language_model).__name__,
        "max_abs_logit_diff": float((out.logits.detach() - outputs["logits"]).abs().max()),
        "loss_abs_diff": abs(out.loss.item() - outputs["loss"].item()),
        "max_abs_grad_diff": max(grad_diffs.values()),
        "grads_compared": len(grad_diffs),
        "max_abs_step_logit_diff": float((step_logits - gen["step_logits"]).abs().max()),
        "generation_equal": bool(torch.equal(generated.sequences, gen["sequences"])),
    }
    result["ok"] = result["generation_equal"] and all(result[k] <= tol for k, tol in TOLERANCE.items())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    ok = True
    for bundle in args.bundles:
        if not (bundle / "config.json").is_file():
            print(
                json.dumps(
                    {"bundle": str(bundle), "ok": False, "error": "no config.json: not a parity bundle"}
                )
            )
            ok = False
            continue
        result = check_bundle(bundle)
        ok &= result["ok"]
        print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
