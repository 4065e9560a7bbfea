#!/usr/bin/env python
"""The last line of bench/gpu.sh: ratios from the JSON lines the other pieces appended to --jsonl.

    summary.py --jsonl FILE

ours / peer: training tokens/s (ours as `openflamingo train` runs by default, and eager), generation, peak memory,
the largest batch; the levers: compiled / eager and one-process FSDP / none (ours.py's variants); the problems
(error records, stages that did not exit 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common import Recorder, parser


def summarize(path: Path, rec: Recorder) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def find(impl: str, what: str, **match: Any) -> dict[str, Any]:
        found = [
            r
            for r in records
            if r.get("impl") == impl
            and r.get("what") == what
            and all(r.get(k) == v for k, v in match.items())
        ]
        return found[-1] if found else {}

    def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
        x, y = a.get(key), b.get(key)
        return round(x / y, 3) if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None

    step = {
        v: find("ours", "train_step", variant=v) for v in ("default", "eager", "eager-frozen-fp32", "fsdp")
    }
    ours_train = step["default"] or step["eager"]
    peer_train = find("peer", "train_step")
    ours_gen, peer_gen = find("ours", "generate"), find("peer", "generate")
    ours_max, peer_max = find("ours", "max_batch"), find("peer", "max_batch")
    cli = find("ours", "cli")
    problems = [
        {k: r.get(k) for k in ("impl", "what", "stage", "rc", "error") if k in r}
        for r in records
        if r.get("what") == "error" or (r.get("what") == "stage" and r.get("rc") != 0)
    ]
    rec(
        "summary",
        ours_over_peer=dict(
            train_tokens_per_s=ratio(ours_train, peer_train, "tokens_per_s"),
            train_tokens_per_s_eager=ratio(step["eager"], peer_train, "tokens_per_s"),
            train_tokens_per_s_eager_frozen_fp32=ratio(step["eager-frozen-fp32"], peer_train, "tokens_per_s"),
            train_peak_mem=ratio(ours_train, peer_train, "peak_mem_gb"),
            gen_new_tokens_per_s=ratio(ours_gen, peer_gen, "new_tokens_per_s"),
            gen_peak_mem=ratio(ours_gen, peer_gen, "peak_mem_gb"),
            max_batch=ratio(ours_max, peer_max, "largest"),
            cli_tokens_per_s_over_peer_bare_step=ratio(cli, peer_train, "tokens_per_s"),
        ),
        levers=dict(
            compiled_over_eager_tokens_per_s=ratio(step["default"], step["eager"], "tokens_per_s"),
            compiled_over_eager_peak_mem=ratio(step["default"], step["eager"], "peak_mem_gb"),
            fsdp_over_none_tokens_per_s=ratio(step["fsdp"], step["default"], "tokens_per_s"),
            fsdp_over_none_peak_mem=ratio(step["fsdp"], step["default"], "peak_mem_gb"),
        ),
        ours=dict(
            train_variant=ours_train.get("variant"),
            train_s=ours_train.get("median_s"),
            tokens_per_s=ours_train.get("tokens_per_s"),
            mfu=ours_train.get("mfu"),
            peak_mem_gb=ours_train.get("peak_mem_gb"),
            warmup_s=ours_train.get("warmup_s"),
            gen_new_tokens_per_s=ours_gen.get("new_tokens_per_s"),
            max_batch=ours_max.get("largest"),
            cli_tokens_per_s=cli.get("tokens_per_s"),
            cli_mfu=cli.get("mfu"),
            cli_data_wait_frac=cli.get("data_wait_frac"),
        ),
        peer=dict(
            train_s=peer_train.get("median_s"),
            tokens_per_s=peer_train.get("tokens_per_s"),
            mfu=peer_train.get("mfu"),
            peak_mem_gb=peer_train.get("peak_mem_gb"),
            gen_new_tokens_per_s=peer_gen.get("new_tokens_per_s"),
            max_batch=peer_max.get("largest"),
        ),
        problems=problems,
    )


def main() -> None:
    args = parser(__doc__).parse_args()
    summarize(Path(args.jsonl), Recorder(Path(args.jsonl), size=args.size))
    sys.exit(0)


if __name__ == "__main__":
    main()
