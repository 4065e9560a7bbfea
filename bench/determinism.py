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
import time
from pathlib import Path

import torch

from openflamingo.model.build import build_flamingo
from openflamingo.train.config import TrainConfig, load_config
from openflamingo.train.data import build_loader
from openflamingo.train.loop import forward_backward
from openflamingo.train.optim import build_optimizer
from openflamingo.train.prefetch import prepare_batch

RECIPE = Path(__file__).parents[1] / "configs" / "demo.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The demo's model and batch sizes; synthetic batches of the demo's shapes (no shard conversion needed).
    config = load_config(RECIPE, ["--data.loader", "synthetic"])
    torch.manual_seed(0)
    model = build_flamingo(config.model, seed=0).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-5))
    loader = build_loader(config.enabled_datasets(), config.data, model, rank=0, world_size=1, seed=0)
    batches = {name: prepare_batch(model, batch) for name, batch in next(loader).items()}
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        start = time.perf_counter()
        for batch in batches.values():
            forward_backward(model, batch, 1.0, torch.device("cpu"), None)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

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
