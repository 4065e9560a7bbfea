"""What deterministic mode costs: the demo recipe's training step with `torch.use_deterministic_algorithms` off and
on, alternated A B A B in one process on the same batches (the machine is shared: side by side, not one after the
other). Prints one JSON line per step and a summary line.

    .venv/bin/python bench/determinism.py [--rounds 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from demo_step import demo_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, step = demo_step()

    times: dict[bool, list[float]] = {False: [], True: []}
    step()  # warm-up
    for round_ in range(args.rounds):
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            seconds = step()
            times[deterministic].append(seconds)
            print(json.dumps({"round": round_, "deterministic": deterministic, "step_s": round(seconds, 3)}))
    torch.use_deterministic_algorithms(False)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({
        "what": "summary", "median_step_s_off": round(off, 3), "median_step_s_on": round(on, 3),
        "cost": round(on / off - 1, 4), "threads": args.threads, "loadavg": os.getloadavg(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
