"""Evaluation over several processes (torchrun): each rank takes every world_size-th example, results are gathered.

Unlike a padded DistributedSampler (OpenFlamingo's), no example is duplicated to even out the shards and none is
dropped: shards differ in size by at most one, and the gathered records are put back in example order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_ranks(backend: str) -> Ranks:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU); a single process
    needs none."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks()
    dist.init_process_group(backend=backend)
    return Ranks(dist.get_rank(), dist.get_world_size())


def shard(items: list, ranks: Ranks) -> list:
    return items[ranks.rank :: ranks.world_size]


def gather(records: list[dict], ranks: Ranks) -> list[dict]:
    """Every rank's records, on every rank, sorted by their `index` (position in the evaluated set)."""
    if ranks.world_size == 1:
        return sorted(records, key=lambda r: r["index"])
    parts: list[list[dict] | None] = [None] * ranks.world_size
    dist.all_gather_object(parts, records)
    merged = [record for part in parts for record in part]
    indices = [r["index"] for r in merged]
    if len(indices) != len(set(indices)):
        raise RuntimeError("distributed evaluation produced an example twice")
    return sorted(merged, key=lambda r: r["index"])


def broadcast(value, ranks: Ranks):
    """Rank 0's `value` on every rank (e.g. an error found while scoring)."""
    if ranks.world_size == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
