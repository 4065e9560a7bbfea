#!/usr/bin/env python
"""The peer's side of bench/gpu.sh: open-flamingo==2.0.1 on the same random-weight model and batch as ours.py.

    peer.py --assets DIR [--size of3b] --what train gen | maxbatch

Run under the peer's own PYTHONPATH (transformers 4.57); imports nothing of ours. The step is OpenFlamingo's
train_one_epoch with amp_bf16 and no FSDP: forward with labels, backward, the embedding-gradient mask of its
<image> and <|endofchunk|> rows, clipping, AdamW (weight decay on the gated cross-attention only); frozen weights
fp32, as it trains. Generation: 8 prompts x 1 image, 64 new tokens, greedy, bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    SHAPES,
    Batch,
    Recorder,
    Shape,
    count_flops,
    device_name,
    gen_record,
    largest_batch,
    make_batch,
    package_version,
    param_counts,
    parser,
    peer_venv_shim,
    prompt_batch,
    reset_peak,
    step_record,
    timed,
)


def run_peer(args: argparse.Namespace, shape: Shape, dev: torch.device, rec: Recorder) -> None:
    import open_clip
    from open_flamingo import create_model_and_transforms

    started = time.perf_counter()
    # The same ViT as ours, QuickGELU as in the "openai" ViT-L/14 OpenFlamingo loads; a 1-layer text tower, which
    # OpenFlamingo drops (it keeps the visual tower only).
    v = shape.vit
    clip_config = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": v["image_size"],
            "layers": v["num_hidden_layers"],
            "width": v["hidden_size"],
            "head_width": v["hidden_size"] // v["num_attention_heads"],
            "patch_size": v["patch_size"],
            "mlp_ratio": v["intermediate_size"] / v["hidden_size"],
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    clip_path = Path(args.assets) / f"bench-vit-{args.size}.json"
    clip_path.write_text(json.dumps(clip_config))
    open_clip.add_model_config(str(clip_path))
    torch.manual_seed(0)
    lm = str(Path(args.assets) / "lm")
    model, _, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=clip_path.stem,
        clip_vision_encoder_pretrained=None,
        lang_encoder_path=lm,
        tokenizer_path=lm,
        cross_attn_every_n_layers=shape.every,
        use_local_files=True,
    )
    media, eoc, pad = model.media_token_id, model.eoc_token_id, tokenizer.pad_token_id
    rec(
        "build",
        build_s=round(time.perf_counter() - started, 1),
        device=device_name(dev),
        torch=torch.__version__,
        transformers=package_version("transformers"),
        **param_counts(model),
    )
    cuda = dev.type == "cuda"
    base = make_batch(shape, shape.batch, shape.seq, shape.images, media, eoc, pad, seed=0)
    embedding = model.lang_encoder.get_input_embeddings()

    def optimizer() -> torch.optim.Optimizer:
        # open_flamingo/train/train.py: AdamW, weight decay on the gated cross-attention parameters only
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (decay if "gated_cross_attn" in name else no_decay).append(param)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4
        )

    def make_step(opt: torch.optim.Optimizer, batch: Batch) -> Callable[[], None]:
        batch = batch.to(dev)

        def step() -> None:  # open_flamingo/train/train_utils.py train_one_epoch with amp_bf16, no FSDP
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(
                    vision_x=batch.images, lang_x=batch.ids, attention_mask=batch.attn, labels=batch.labels
                )[0]
            loss.backward()
            # only the <image> and <|endofchunk|> rows of the input embedding learn
            if embedding.weight.grad is not None:
                keep = torch.zeros_like(embedding.weight.grad)
                keep[media] = 1
                keep[eoc] = 1
                embedding.weight.grad = embedding.weight.grad * keep
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def train() -> None:
        model.to(dev).train()
        step = make_step(optimizer(), base)
        reset_peak(dev)
        times = timed(step, dev, shape.warmup, shape.runs)
        rec(
            "train_step",
            frozen_dtype="fp32",
            batch=shape.batch,
            seq=shape.seq,
            images=shape.images,
            **step_record(times, shape.batch * shape.seq, count_flops(step), dev),
        )

    def generate() -> None:
        dtype = torch.bfloat16 if cuda else torch.float32
        model.to(dev, dtype).eval()
        prompts = prompt_batch(shape, media, pad).to(dev, dtype)

        def gen() -> torch.Tensor:
            with torch.no_grad():
                return model.generate(
                    prompts.images,
                    prompts.ids,
                    prompts.attn,
                    max_new_tokens=shape.gen_new,
                    min_new_tokens=shape.gen_new,
                    num_beams=1,
                    do_sample=False,
                    pad_token_id=pad,
                )

        reset_peak(dev)
        out = gen()  # warm-up
        times = timed(gen, dev, 0, max(1, shape.runs // 3))
        rec("generate", **gen_record(times, out, shape, dev))

    def search() -> None:
        model.to(dev).train()
        opt = optimizer()
        largest_batch(
            rec, shape, dev, lambda b: make_step(opt, base.repeat(b // shape.batch)), frozen_dtype="fp32"
        )
        opt.zero_grad(set_to_none=True)  # a step that ran out of memory may have left gradients

    if "train" in args.what:
        rec.stage("train_fp32", train)
    if "maxbatch" in args.what:
        rec.stage("maxbatch", search)
    if "gen" in args.what:
        rec.stage("generate", generate)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--what", nargs="+", default=["train", "gen"], choices=["train", "gen", "maxbatch"])
    args = ap.parse_args()
    peer_venv_shim()
    rec = Recorder(Path(args.jsonl), impl="peer", size=args.size)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rec.stage("build", lambda: run_peer(args, SHAPES[args.size], dev, rec))
    sys.exit(1 if rec.errors else 0)


if __name__ == "__main__":
    main()
