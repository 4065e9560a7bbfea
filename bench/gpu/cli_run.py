#!/usr/bin/env python
"""`openflamingo train` itself on the bench shape (bench/of3b-synthetic.toml, 30 steps), for bench/gpu.sh:

    cli_run.py args   --assets DIR --run-dir DIR [--size of3b]     the recipe's overrides, one per line
    cli_run.py record --metrics FILE --wall-s S --rc RC            one JSON line from the run's metrics.jsonl

The run uses the recipe's defaults for what this file does not override: on a GPU that includes
parallel.compile = "auto" (compiled) and bf16.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from common import SHAPES, Recorder, Shape, parser


def cli_args(shape: Shape, assets: Path, run_dir: Path) -> list[str]:
    """Overrides of bench/of3b-synthetic.toml: where the assets and the run live, and the shape if not of3b."""
    args = ["--model.language_model", str(assets / "lm"), "--train.output_dir", str(run_dir), *shape.cli]
    if shape.cli:
        vit = {**shape.vit, "hidden_act": "quick_gelu"}
        args += [
            "--model.vision.config",
            "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in vit.items()) + "}",
        ]
    if not torch.cuda.is_available():  # bf16 autocast is for GPUs (and far slower than fp32 on most CPUs)
        args += ["--precision.autocast", "fp32", "--precision.frozen_dtype", "fp32"]
    return args


def cli_record(metrics: Path, wall_s: float, rc: int, rec: Recorder) -> None:
    """The CLI's own logged numbers (one record per log interval): medians over the intervals after the first,
    which holds the warm-up, and each interval's tokens/s."""
    rows = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if metrics.is_file()
        else []
    )
    steady = rows[1:] or rows

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return round(statistics.median(values), 4) if values else None

    rec(
        "cli",
        rc=rc,
        wall_s=round(wall_s, 1),
        logged_steps=[r.get("step") for r in rows],
        tokens_per_s_each=[round(r["tokens_per_s"], 1) for r in rows if "tokens_per_s" in r],
        step_time_s=median("step_time_s"),
        tokens_per_s=median("tokens_per_s"),
        mfu=median("mfu"),
        data_wait_frac=median("data_wait_frac"),
        final_loss=rows[-1].get("loss") if rows else None,
    )


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("command", choices=["args", "record"])
    ap.add_argument("--run-dir", default="/tmp/bench-run", help="args: the CLI run's output_dir")
    ap.add_argument(
        "--metrics", default="/tmp/bench-run/metrics.jsonl", help="record: the run's metrics.jsonl"
    )
    ap.add_argument("--wall-s", type=float, default=0.0, help="record: the run's wall time")
    ap.add_argument("--rc", type=int, default=0, help="record: the run's exit status")
    args = ap.parse_args()
    if args.command == "args":
        print("\n".join(cli_args(SHAPES[args.size], Path(args.assets), Path(args.run_dir))))
    else:
        cli_record(
            Path(args.metrics), args.wall_s, args.rc, Recorder(Path(args.jsonl), impl="ours", size=args.size)
        )
    sys.exit(0)


if __name__ == "__main__":
    main()
