"""Models built without weights, for checkpoints whose tensors replace every parameter.

Building a model the usual way allocates and randomly initialises every parameter in fp32, only for a checkpoint
to overwrite them: for IDEFICS-80B that is 320 GB of random numbers before 160 GB of bf16 weights arrive. Built inside
`parameters_on_meta`, a model's parameters live on the meta device (shapes only: no memory, and initialising them
does nothing); `assign_weights` then makes the checkpoint's tensors themselves the parameters
(`load_state_dict(assign=True)`): no copy, and each keeps its stored dtype. safetensors' `load_file` maps the file
into memory, so until something writes to them the weights are the file's pages, which the kernel can drop again.

Buffers are built as usual, on the CPU: the non-persistent ones (the rotary embedding's `inv_freq`, CLIP's
`position_ids`) are in no checkpoint but computed by their modules' constructors, so they must be real from the start.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from ..errors import InputError


def _to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    if param is None or param.is_meta:
        return None  # keep it as it is
    # The constructor's tensor is dropped here, before its module's `reset_parameters` would fill it.
    return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay where their modules put them.

    The hook is process-wide (torch's parameter registration hook): modules built meanwhile by other threads get
    meta parameters too."""
    handle = register_module_parameter_registration_hook(_to_meta)
    try:
        yield
    finally:
        handle.remove()


def assign_weights(
    model: nn.Module, state: dict[str, torch.Tensor], expected: Collection[str], source: str | Path
) -> None:
    """Make `state`'s tensors `model`'s parameters and persistent buffers (no copy, their dtype kept). A missing,
    unexpected or mis-shaped tensor, or a parameter or buffer left without weights, is an error naming it and
    `source`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"{source}: {_key_list('missing', missing)}{_key_list('unexpected', unexpected)}".rstrip("; ")
        )
    own = model.state_dict()
    for key in expected:
        if own[key].shape != state[key].shape:
            raise InputError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    empty = [
        name for name, tensor in chain(model.named_parameters(), model.named_buffers()) if tensor.is_meta
    ]
    if empty:
        raise InputError(f"{source}: {_key_list('unloaded', empty)}".rstrip("; ") + " (no tensor holds them)")


def _key_list(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    return f"{len(keys)} {what} key(s): {shown}; "
