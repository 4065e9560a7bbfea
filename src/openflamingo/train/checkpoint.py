"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, written by every rank in parallel.

A checkpoint is `output_dir/checkpoints/step_00001000/` holding the trainable model parameters, the optimizer, the
schedule and counters, and per rank the data-loader state and RNG states. It is written under a temporary name
and renamed when complete, so a crash (even SIGKILL) leaves either the previous checkpoints or the new one, never a
half one; resume ignores anything that is not a complete checkpoint. Loading is strict: a tensor missing from the
checkpoint, a tensor the run does not expect, or a shape mismatch is an error. A run may resume on another number
of processes: DCP reshards the model and optimizer, and every process then reads all the saved per-rank states
(the loop merges their loader states).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import InputError
from .distributed import Distributed, barrier
from .parallelize import unwrap

NAME = re.compile(r"step_(\d{8})")
TMP_PREFIX = ".tmp-"
META = "meta.json"
# Module-name parts that wrappers insert; DCP's state-dict helpers strip them too.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def trainable_names(model: nn.Module) -> set[str]:
    names = set()
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            for prefix in WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            names.add(name)
    return names


def model_state(model: nn.Module) -> dict[str, Any]:
    """The trainable parameters (sharded DTensors under FSDP); frozen backbones come from the model config."""
    names = trainable_names(model)
    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    return {k: v for k, v in state.items() if k in names}


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _pack(obj: Any) -> torch.Tensor:
    # Per-rank state goes in as a byte tensor under a per-rank key: DCP writes tensors from every rank, whereas
    # plain Python objects are treated as replicated and written by one rank only.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _unpack(tensor: torch.Tensor) -> Any:
    # Our own file (DCP's metadata is pickled too); loader states may hold arbitrary Python objects.
    return torch.load(io.BytesIO(tensor.numpy().tobytes()), weights_only=False)


def _flat_keys(state: dict[str, Any]) -> set[str]:
    # The flattening DCP itself applies to nested state dicts (private, but the only way to name its keys).
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return set(flatten_state_dict(state)[0])


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, dist: Distributed):
        self.root = Path(root)
        self.keep = keep
        self.dist = dist

    # ----- finding checkpoints ----------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if NAME.fullmatch(p.name) and (p / META).is_file()]
        return sorted(found, key=lambda p: p.name)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: "auto" = the newest complete one (or none), "none", or a name/path."""
        if resume == "none":
            return None
        if resume == "auto":
            found = self.complete()
            return found[-1] if found else None
        for candidate in (Path(resume), self.root / resume):
            if candidate.is_dir():
                if not (candidate / META).is_file() or not (candidate / ".metadata").is_file():
                    raise InputError(f"checkpoint.resume: {candidate} is not a complete checkpoint")
                return candidate
        raise InputError(f"checkpoint.resume: no checkpoint {resume!r} (nor {self.root / resume})")

    # ----- saving ---------------------------------------------------------------------------------------------------
    def save(
        self, step: int, model: nn.Module, optimizer, train_state: dict[str, Any], rank_state: dict[str, Any]
    ) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while saving this step before
        barrier()
        state = {
            "model": model_state(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "train": train_state,
            f"rank_{self.dist.rank}": _pack({**rank_state, "rng": capture_rng()}),
        }
        with _single_process_is_fine():
            dcp.save(state, checkpoint_id=str(tmp))
        if self.dist.is_main:
            meta = {"step": step, "world_size": self.dist.world_size, "format": "openflamingo-train-dcp/1"}
            (tmp / META).write_text(json.dumps(meta) + "\n")
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step after a resume from an older checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ----- loading --------------------------------------------------------------------------------------------------
    def load(
        self, path: Path, model: nn.Module, optimizer, train_template: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[int, dict[str, Any]], int]:
        """Restore model and optimizer in place; return (train state, {rank: that rank's state incl. RNG, not yet
        restored}, the number of processes that wrote it): this rank's state alone when that number is this run's,
        else every rank's."""
        meta = json.loads((path / META).read_text())
        same_layout = meta["world_size"] == self.dist.world_size
        ranks = [self.dist.rank] if same_layout else list(range(meta["world_size"]))
        reader = dcp.FileSystemReader(str(path))
        saved = reader.read_metadata().state_dict_metadata
        rank_keys = [f"rank_{rank}" for rank in ranks]
        for rank, key in zip(ranks, rank_keys, strict=True):
            if key not in saved:
                raise InputError(f"{path}: no state for process {rank}")
        state = {
            "model": model_state(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "train": train_template,
            **{key: torch.empty(saved[key].size, dtype=torch.uint8) for key in rank_keys},
        }
        expected = _flat_keys(state)
        other_ranks = {k for k in saved if k.startswith("rank_") and k not in rank_keys}
        unexpected = sorted(set(saved) - expected - other_ranks)
        missing = sorted(expected - set(saved))
        if unexpected or missing:
            found = f"{_describe('missing', missing)}{_describe('unexpected', unexpected)}".rstrip("; ")
            raise InputError(f"{path}: does not match this run: {found}")
        # The default load planner refuses partial loads and size mismatches; DCP reports any rank's failure as a
        # CheckpointException (a BaseException) whose last line is the cause.
        try:
            with _single_process_is_fine():
                dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as error:
            raise InputError(f"{path}: cannot load: {str(error).strip().splitlines()[-1]}") from None
        result = set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
        not_loaded = trainable_names(model) & set(result.missing_keys)
        if result.unexpected_keys or not_loaded:
            raise InputError(
                f"{path}: model did not load completely ({sorted(not_loaded or result.unexpected_keys)})"
            )
        set_optimizer_state_dict(model, optimizer, state["optim"])
        rank_states = {rank: _unpack(state[key]) for rank, key in zip(ranks, rank_keys, strict=True)}
        return state["train"], rank_states, meta["world_size"]


@contextlib.contextmanager
def _single_process_is_fine():
    """Without a process group DCP warns that it assumes a single process, which is exactly our case."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def _describe(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    return f"{len(keys)} {what} key(s): {shown}; "


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_final(model: nn.Module, config, directory: Path, dist: Distributed) -> Path:
    """`save_pretrained` the trained model (rank 0 writes). Under FSDP the trainable parameters are gathered on rank 0
    and copied into a plain model rebuilt exactly as training built it (same seed, so backbones initialised from a
    config are identical too; frozen weights in the training storage dtype)."""
    from ..model.checkpoint import build_or_load, load_strict, save_pretrained
    from .parallelize import cast_frozen, frozen_dtype

    flamingo = unwrap(model)
    if not any(hasattr(p, "full_tensor") for p in flamingo.parameters()):  # not sharded
        if dist.is_main:
            save_pretrained(flamingo, directory, overwrite=True)
        barrier()
        return directory
    names = trainable_names(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    full = get_model_state_dict(model, options=options)  # collective; only rank 0 receives the tensors
    if dist.is_main:
        rng = torch.get_rng_state()
        torch.manual_seed(config.train.seed)
        plain = build_or_load(config.model, seed=config.train.seed)
        torch.set_rng_state(rng)
        cast_frozen(plain, frozen_dtype(config, dist.device))
        load_strict(
            plain, {k: v for k, v in full.items() if k in names}, sorted(names), source="training state"
        )
        save_pretrained(plain, directory, overwrite=True)
    barrier()
    return directory
