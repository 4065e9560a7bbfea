#!/usr/bin/env python
"""Rank-classification throughput: ours vs OpenFlamingo 2.0.1's scoring loop, same tiny model, side by side.

    python bench/eval.py [--classes 1000] [--batch-size 8] [--batches 1] [--threads 1]

The model is the committed parity bundle tests/fixtures/parity/llama (a tiny OpenFlamingo written by the peer
itself). The peer side runs in its own virtual environment (tools/parity/setup_peer.sh, $PEER_VENV, default
/tmp/openflamingo-peer-venv), in a subprocess; this library never imports it. It replicates OpenFlamingo's
`EvalModel.get_rank_classifications`: with caching (its default) the prompt is cached once, then every class name
is scored by one forward per class-name token; without caching (--no_caching_for_classification) every class name
is a full forward of prompt + name + images. Two fixes keep its numbers comparable: the grown KV cache is cropped
back after each class (OpenFlamingo's code predates in-place Cache objects), and prompts are equally long (its
cached path passes no attention mask). Ours: `openflamingo.eval.inference.rank_classes_from_tensors`.

Both sides get the same token ids, images (OpenFlamingo's ImageNet prompt "<image>Output:{class}<|endofchunk|>",
`--shots` demonstrations) and the 1000 ImageNet class names; the log-likelihoods are compared. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tests" / "fixtures" / "parity" / "llama"
PEER_VENV = Path(os.environ.get("PEER_VENV", "/tmp/openflamingo-peer-venv"))


def imagenet_prompt(class_names, shots: int) -> str:
    """OpenFlamingo's ImageNet prompt with `shots` demonstrations (the same ones for every example, so that all
    prompts are equally long)."""
    return "".join(f"<image>Output:{name}<|endofchunk|>" for name in class_names[:shots]) + "<image>Output:"


def best_of(repeats: int, run):
    """Best wall time of `repeats` runs (this machine's cores are shared) and the last run's result."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


# ----- peer side (runs with the peer venv's python; imports open_flamingo, never openflamingo) --------------------
def peer_rank_cached(model, input_ids, attention_mask, vision_x, class_ids):
    batch, _ = input_ids.shape
    prefix_length = input_ids.shape[1]
    model.cache_media(input_ids=input_ids, vision_x=vision_x)
    pre = model(
        vision_x=None,
        lang_x=input_ids,
        attention_mask=attention_mask,
        clear_conditioned_layers=False,
        use_cache=True,
    )
    scores = []
    for tokens in class_ids:
        names = torch.tensor(tokens)[None].repeat(batch, 1)
        cache, logits = pre.past_key_values, [pre.logits]
        for t in range(names.shape[1]):  # OpenFlamingo's EvalModel.__call__: one forward per token
            out = model(vision_x=None, lang_x=names[:, t : t + 1], attention_mask=None,
                        clear_conditioned_layers=False, past_key_values=cache, use_cache=True)  # fmt: skip
            cache = out.past_key_values
            logits.append(out.logits)
        logprobs = torch.log_softmax(torch.cat(logits, dim=1), dim=-1)[:, -len(tokens) - 1 : -1]
        scores.append(logprobs.gather(2, names[:, :, None]).squeeze(-1).mean(1))
        if hasattr(pre.past_key_values, "crop"):
            pre.past_key_values.crop(prefix_length)
    model.uncache_media()
    return torch.vstack(scores).T


def peer_rank_uncached(model, input_ids, attention_mask, vision_x, class_ids):
    batch = input_ids.shape[0]
    scores = []
    for tokens in class_ids:
        names = torch.tensor(tokens)[None].repeat(batch, 1)
        lang_x = torch.cat([input_ids, names], dim=1)
        mask = torch.cat([attention_mask, torch.ones_like(names).bool()], dim=1)
        logits = model(
            vision_x=vision_x, lang_x=lang_x, attention_mask=mask, clear_conditioned_layers=True
        ).logits
        logprobs = torch.log_softmax(logits, dim=-1)[:, -len(tokens) - 1 : -1]
        scores.append(logprobs.gather(2, names[:, :, None]).squeeze(-1).mean(1))
    return torch.vstack(scores).T


def peer_main(inputs_file: Path, output_file: Path, threads: int, modes: list[str], repeats: int) -> None:
    sys.path.insert(0, str(REPO / "tools" / "parity"))
    import make_fixtures as peer_fixtures  # installs its torchvision stub, then builds models with open_flamingo

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-peer-"))
    (work / "open_clip").mkdir()
    peer_fixtures.register_vit(work / "open_clip")
    peer_fixtures.train_tokenizer(work / "tokenizer")
    model, *_ = peer_fixtures.build_model("llama", work, peer_fixtures.SEED, False)
    model.load_state_dict(load_file(BUNDLE / "state_dict.safetensors"), strict=True)
    model.eval()
    data = load_file(inputs_file)
    class_ids = json.loads(data.pop("class_ids_json").numpy().tobytes().decode())
    batch_size = int(data["batch_size"])
    ids, mask, vision_x = data["input_ids"], data["attention_mask"].bool(), data["vision_x"]
    batches = [slice(b, b + batch_size) for b in range(0, ids.shape[0], batch_size)]
    results = {}
    for mode in modes:
        rank = peer_rank_cached if mode == "cached" else peer_rank_uncached
        with torch.inference_mode():
            rank(model, ids[:1], mask[:1], vision_x[:1], class_ids[:5])  # warm-up
            seconds, scores = best_of(
                repeats,
                lambda rank=rank: torch.cat(
                    [rank(model, ids[r], mask[r], vision_x[r], class_ids) for r in batches]
                ),
            )
        results[f"scores_{mode}"] = scores.float().contiguous()
        results[f"seconds_{mode}"] = torch.tensor(seconds)
    save_file(results, str(output_file))


# ----- our side and the comparison --------------------------------------------------------------------------------
def our_model():
    sys.path.insert(0, str(REPO / "tools" / "parity"))
    from check import flamingo_config  # builds our config from a parity bundle

    from openflamingo import build_flamingo
    from openflamingo.model.convert.openflamingo import load_open_flamingo_state_dict

    torch.manual_seed(0)
    model = build_flamingo(flamingo_config(BUNDLE, json.loads((BUNDLE / "config.json").read_text())))
    load_open_flamingo_state_dict(model, load_file(BUNDLE / "state_dict.safetensors"))
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000, help="first N ImageNet class names")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shots", type=int, default=4, help="demonstrations (with images) in each prompt")
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides")
    parser.add_argument("--repeats", type=int, default=2, help="timings are the best of this many runs")
    parser.add_argument("--rank-rows", type=int, default=64, help="ours: prompt x class rows per forward")
    parser.add_argument(
        "--peer-modes", nargs="+", default=["cached", "uncached"], choices=["cached", "uncached"]
    )
    parser.add_argument(
        "--peer-side", nargs=2, type=Path, help=argparse.SUPPRESS
    )  # inputs, output (internal)
    args = parser.parse_args()
    if args.peer_side:
        peer_main(*args.peer_side, args.threads, args.peer_modes, args.repeats)
        return 0

    from openflamingo.eval.imagenet_classes import IMAGENET_CLASSNAMES
    from openflamingo.eval.inference import rank_classes_from_tensors, tokenize_class_names

    torch.set_num_threads(args.threads)
    model = our_model()
    examples = args.batch_size * args.batches
    prompt = imagenet_prompt(IMAGENET_CLASSNAMES, args.shots)
    encoded = model.tokenizer([prompt] * examples, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    vision_x = torch.randn(examples, args.shots + 1, 1, 3, 32, 32, generator=generator)
    class_ids = tokenize_class_names(model.tokenizer, IMAGENET_CLASSNAMES[: args.classes])
    common = {"examples": examples, "classes": args.classes, "shots": args.shots, "prompt_tokens": encoded.input_ids.shape[1],
              "class_tokens_mean": sum(map(len, class_ids)) / len(class_ids), "threads": args.threads}  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        inputs_file, output_file = Path(tmp) / "inputs.safetensors", Path(tmp) / "peer.safetensors"
        blob = torch.frombuffer(bytearray(json.dumps(class_ids).encode()), dtype=torch.uint8)
        save_file({"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask, "vision_x": vision_x,
                   "class_ids_json": blob, "batch_size": torch.tensor(args.batch_size)}, str(inputs_file))  # fmt: skip
        python = PEER_VENV / "bin" / "python"
        if not python.is_file():
            raise FileNotFoundError(
                f"{python} not found: build the peer venv with bash tools/parity/setup_peer.sh"
            )
        command = [str(python), __file__, "--peer-side", str(inputs_file), str(output_file),
                   "--threads", str(args.threads), "--repeats", str(args.repeats), "--peer-modes", *args.peer_modes]  # fmt: skip
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": ""})
        peer = load_file(output_file)

    batches = [slice(b, b + args.batch_size) for b in range(0, examples, args.batch_size)]
    ids, mask = encoded.input_ids, encoded.attention_mask
    with torch.inference_mode():
        rank_classes_from_tensors(model, ids[:1], mask[:1], vision_x[:1], class_ids[:5])  # warm-up
        ours_seconds, ours = best_of(
            args.repeats,
            lambda: torch.cat(
                [
                    rank_classes_from_tensors(model, ids[r], mask[r], vision_x[r], class_ids, args.rank_rows)
                    for r in batches
                ]
            ),
        )

    summary = {"bench": "rank_classification_throughput", "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, **common}  # fmt: skip
    ours_rate = examples / ours_seconds
    print(json.dumps({**summary, "method": "openflamingo (ours): cached prefix, batched class names",
                      "rank_rows": args.rank_rows, "seconds": round(ours_seconds, 3),
                      "examples_per_s": round(ours_rate, 3)}))  # fmt: skip
    for mode in args.peer_modes:
        seconds = float(peer[f"seconds_{mode}"])
        diff = (peer[f"scores_{mode}"] - ours).abs().max().item()
        same_top1 = bool((peer[f"scores_{mode}"].argmax(1) == ours.argmax(1)).all())
        label = {"cached": "open-flamingo 2.0.1 get_rank_classifications, use_cache=True (its default)",
                 "uncached": "open-flamingo 2.0.1 get_rank_classifications, use_cache=False"}[mode]  # fmt: skip
        print(json.dumps({**summary, "method": label, "seconds": round(seconds, 3),
                          "examples_per_s": round(examples / seconds, 3),
                          "ours_speedup": round(ours_rate / (examples / seconds), 2),
                          "max_abs_logprob_diff_vs_ours": diff, "same_top1_as_ours": same_top1}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
