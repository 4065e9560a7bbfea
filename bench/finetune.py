"""What fine-tuning the LM costs: the demo model's training step with the Flamingo parts only, with LoRA on the
LM's attention (rank 8, as configs/finetune-demo.toml), and with the whole LM trained. Each variant runs in its own
child process (peak RSS is per process), alternated A B C A B C; one JSON line per measurement and a summary line.

    .venv/bin/python bench/finetune.py [--rounds 2] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

LORA = "{rank = 8, alpha = 16.0, target_modules = ['q_proj', 'k_proj', 'v_proj', 'o_proj']}"
VARIANTS = {
    "flamingo_parts": [],
    "lora_r8": ["--model.lora", LORA],
    "full_lm": ["--model.train_language_model", "true"],
}


def measure(variant: str, steps: int, threads: int) -> dict:
    import torch
    from demo_step import demo_step

    torch.set_num_threads(threads)
    model, step = demo_step(VARIANTS[variant])
    params = [p for p in model.parameters() if p.requires_grad]
    times = [step() for _ in range(steps + 1)]  # the first is a warm-up
    return {
        "variant": variant,
        "trainable_params": sum(p.numel() for p in params),
        "step_s": statistics.median(times[1:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.threads)))
        return
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps)]
            command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            record = json.loads(done.stdout.strip().splitlines()[-1])
            results[variant].append(record)
            print(json.dumps({"round": round_, **record}), flush=True)
    base = statistics.median(r["step_s"] for r in results["flamingo_parts"])
    summary = {
        variant: {
            "trainable_params": records[0]["trainable_params"],
            "step_s": round(statistics.median(r["step_s"] for r in records), 3),
            "step_vs_flamingo_parts": round(statistics.median(r["step_s"] for r in records) / base, 3),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in records)),
        }
        for variant, records in results.items()
    }
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
