"""Process group and device from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InputError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Distributed:
    """Join the process group when launched by torchrun with several processes (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device: 'cuda' requested but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Distributed(rank, world_size, local_rank, dev)


# Whether this module initialised a one-process group (init_single_process_group), so teardown() ends it too.
_owns_single_process_group = False


def init_single_process_group(device: torch.device) -> None:
    """A process group of this process alone, where none exists: what FSDP2 needs to wrap a model on one process.
    Gloo on CPUs, NCCL on GPUs (as `setup`); an in-memory store, since there is no peer to rendezvous with."""
    global _owns_single_process_group
    if dist.is_initialized():
        return
    cuda = device.type == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=device if cuda else None,
    )
    _owns_single_process_group = True


def teardown(state: Distributed, finished: bool = True) -> None:
    global _owns_single_process_group
    if _owns_single_process_group and dist.is_initialized():
        dist.destroy_process_group()  # one process: no peer to wait for
        _owns_single_process_group = False
    if state.enabled and dist.is_initialized():
        if finished:
            # Every rank finishes its collectives before any rank tears the group down; destroying a gloo group
            # while a peer still talks to it can abort the process at exit. (After an error, peers may never
            # arrive: no barrier then.)
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a (small, CPU) tensor over ranks in place; NCCL only reduces GPU tensors, so it travels there and back."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and not tensor.is_cuda:
            on_device = tensor.cuda()
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            tensor.copy_(on_device.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """rank 0's value of `obj` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
