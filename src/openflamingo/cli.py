"""The `openflamingo` command: train | eval | data | convert | generate | export | presets | serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .console import run_command, show_logs
from .errors import InputError


def convert_open_flamingo(args: argparse.Namespace) -> None:
    from .model.checkpoint import save_pretrained
    from .model.convert.mpt import convert_mosaic_gpt, is_remote_code_mpt
    from .model.convert.openflamingo import convert_open_flamingo_checkpoint

    language_model = args.language_model
    if is_remote_code_mpt(language_model):  # 3B / 9B releases: MosaicML remote code -> transformers MPT first
        language_model = str(args.out) + "-language-model"
        print(convert_mosaic_gpt(args.language_model, language_model, overwrite=args.overwrite).summary())
        print(f"saved {language_model}")
    model, report = convert_open_flamingo_checkpoint(
        args.checkpoint,
        language_model,
        args.vision_encoder,
        heads=args.heads,
        decoder_layers_path=args.decoder_layers_path,
    )
    print(report.summary())
    save_pretrained(model, args.out, include_backbones=args.include_backbones, overwrite=args.overwrite)
    print(f"saved {args.out}")


def convert_mosaic_gpt_directory(args: argparse.Namespace) -> None:
    from .model.convert.mpt import convert_mosaic_gpt

    print(convert_mosaic_gpt(args.directory, args.out, overwrite=args.overwrite).summary())
    print(f"saved {args.out}")


def convert_idefics_directory(args: argparse.Namespace) -> None:
    import torch

    from .model.convert.idefics import convert_idefics

    instruct = {"auto": None, "instruct": True, "few-shot": False}[args.prompt_format]
    dtype = {"stored": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    report = convert_idefics(
        args.directory, args.out, overwrite=args.overwrite, instruct=instruct, dtype=dtype
    )
    print(report.summary())
    print(f"saved {args.out}")


def generate(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from .model.checkpoint import load
    from .model.inputs import prepare_inputs, to_device
    from .model.prompt_format import MEDIA, Message

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(args.checkpoint).to(device).eval()
    images = []
    for path in args.image:
        try:
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: cannot read image ({error})") from None
    prompt = args.prompt
    if args.question is not None:  # written the way the model was trained (its recorded prompt format)
        question = Message("user", MEDIA * len(images) + args.question)
        prompt = model.config.prompt_format.render(
            [question], model.tokenizer, add_generation_prompt=True
        ).text
    inputs = to_device(prepare_inputs(model, [prompt], [images]), device)
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        do_sample=args.temperature > 0,
        **({"temperature": args.temperature} if args.temperature > 0 else {}),
    )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    print(model.tokenizer.decode(new_tokens, skip_special_tokens=True).strip())


def print_presets(args: argparse.Namespace) -> None:
    from .model.presets import preset_table

    print(preset_table())


def export(args: argparse.Namespace) -> None:
    import dataclasses

    from .model.checkpoint import load, save_pretrained
    from .model.lora import merge_lora

    model = load(args.checkpoint)
    if args.merge_lora:
        if model.config.lora is None:
            raise InputError(f"{args.checkpoint} has no LoRA adapters to merge")
        merged_lm = merge_lora(model.language_model)
        # The blocks are always in model.safetensors; merged, they are plain layers again.
        merged_blocks = merge_lora(model.cross_attn_blocks)
        if merged_lm:
            # The LM's weights now differ from the named one: the checkpoint stores them and describes the
            # architecture.
            model.config = dataclasses.replace(
                model.config, language_model=None, language_model_config=model.language_model.config.to_dict()
            )
        model.config = dataclasses.replace(model.config, lora=None)
        print(
            f"merged {merged_lm} LoRA adapters into the language model and {merged_blocks} into the "
            "cross-attention blocks"
        )
    save_pretrained(model, args.out, include_backbones=args.include_backbones, overwrite=args.overwrite)
    print(f"saved {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openflamingo", description="Flamingo-style vision-language models")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert checkpoints of other frameworks")
    sources = convert.add_subparsers(dest="source", required=True)
    open_flamingo = sources.add_parser(
        "open-flamingo", help="an OpenFlamingo 2.0.1 checkpoint.pt / state dict"
    )
    open_flamingo.add_argument("checkpoint", type=Path, help="checkpoint.pt (weights only) or .safetensors")
    open_flamingo.add_argument("--language-model", required=True, help="packaged name or local HF directory")
    open_flamingo.add_argument(
        "--vision-encoder", required=True, help="packaged name, HF dir or open_clip file"
    )
    open_flamingo.add_argument(
        "--out", type=Path, required=True, help="directory for the converted checkpoint"
    )
    open_flamingo.add_argument("--heads", type=int, default=8, help="attention heads (not visible in shapes)")
    open_flamingo.add_argument("--decoder-layers-path", default=None, help="e.g. transformer.blocks")
    open_flamingo.add_argument(
        "--include-backbones", action="store_true", help="store LM and vision weights too"
    )
    open_flamingo.add_argument("--overwrite", action="store_true")
    open_flamingo.set_defaults(run=convert_open_flamingo)
    mosaic_gpt = sources.add_parser(
        "mosaic-gpt",
        help="a MosaicGPT / remote-code MPT directory -> transformers MptForCausalLM (no code is run)",
    )
    mosaic_gpt.add_argument("directory", type=Path, help="config.json + weights (+ tokenizer) as downloaded")
    mosaic_gpt.add_argument("out", type=Path, help="directory for the converted language model")
    mosaic_gpt.add_argument("--overwrite", action="store_true")
    mosaic_gpt.set_defaults(run=convert_mosaic_gpt_directory)
    idefics = sources.add_parser(
        "idefics",
        help="a HuggingFaceM4/idefics-* directory (9B, 80B, -instruct) -> an openflamingo checkpoint",
    )
    idefics.add_argument("directory", type=Path, help="config.json, *.safetensors, tokenizer as downloaded")
    idefics.add_argument("out", type=Path, help="directory for the converted checkpoint")
    idefics.add_argument(
        "--prompt-format",
        choices=("auto", "instruct", "few-shot"),
        default="auto",
        help="record the -instruct dialogue format or OpenFlamingo's few-shot one (auto: by the directory name)",
    )
    idefics.add_argument(
        "--dtype",
        choices=("stored", "fp32", "bf16", "fp16"),
        default="stored",
        help="dtype of the written weights (stored: as in the source files, bf16 on the Hub)",
    )
    idefics.add_argument("--overwrite", action="store_true")
    idefics.set_defaults(run=convert_idefics_directory)

    gen = commands.add_parser("generate", help="answer a prompt about images with a saved model")
    gen.add_argument("--checkpoint", type=Path, required=True)
    gen.add_argument("--image", type=Path, action="append", default=[], help="repeat for several images")
    text = gen.add_mutually_exclusive_group(required=True)
    text.add_argument(
        "--question", help="a question about the images, written in the model's recorded prompt format"
    )
    text.add_argument(
        "--prompt", help='the raw prompt, one <image> per image, e.g. "<image>Question: ... Answer:"'
    )
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--num-beams", type=int, default=1)
    gen.add_argument("--temperature", type=float, default=0.0, help="> 0 samples instead of greedy decoding")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    gen.set_defaults(run=generate)

    exporter = commands.add_parser(
        "export", help="re-save a checkpoint: merge LoRA adapters, store backbones"
    )
    exporter.add_argument("checkpoint", type=Path, help="a save_pretrained directory")
    exporter.add_argument("out", type=Path, help="the new directory")
    exporter.add_argument(
        "--merge-lora",
        action="store_true",
        help="fold the LoRA adapters into the LM and cross-attention weights",
    )
    exporter.add_argument("--include-backbones", action="store_true", help="store LM and vision weights too")
    exporter.add_argument("--overwrite", action="store_true")
    exporter.set_defaults(run=export)

    presets = commands.add_parser(
        "presets", help="the named architectures (OpenFlamingo, IDEFICS) and their sizes"
    )
    presets.set_defaults(run=print_presets)

    from .data.cli import register as register_data
    from .eval.cli import register as register_eval
    from .serve.cli import register as register_serve
    from .train.cli import register as register_train

    register_train(commands)
    register_data(commands)
    register_eval(commands)
    register_serve(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        show_logs()
    return run_command(args.command, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
