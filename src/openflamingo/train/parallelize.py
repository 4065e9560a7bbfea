"""Everything the model does not know about: frozen-weight precision, activation checkpointing, torch.compile, and
DDP / FSDP2 wrapping. Applied in that order (compile before checkpointing, see parallelize()), after the model is built and before the optimizer is (torchtitan)."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..errors import InputError
from ..model.flamingo import Flamingo
from .config import RunConfig
from .distributed import Distributed, init_single_process_group

logger = logging.getLogger(__name__)


def autocast_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    choice = config.precision.autocast
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if choice == "bf16" else None


def frozen_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    choice = config.precision.frozen_dtype
    if choice == "auto":
        return autocast_dtype(config, device) or torch.float32
    if choice == "bf16" and autocast_dtype(config, device) is None:
        raise InputError(
            "precision.frozen_dtype: 'bf16' needs precision.autocast = 'bf16' (or 'auto' on GPUs)"
        )
    return torch.bfloat16 if choice == "bf16" else torch.float32


def cast_frozen(model: Flamingo, dtype: torch.dtype) -> None:
    """Store the frozen matrices in `dtype` (bf16 halves the backbones' memory). Vectors (norm weights, biases) and
    buffers (rotary frequencies, BatchNorm statistics) stay fp32: tiny, and precision-sensitive."""
    for param in model.parameters():
        if not param.requires_grad and param.ndim >= 2:
            param.data = param.data.to(dtype)


def decoder_layers(model: Flamingo) -> nn.ModuleList:
    return model.language_model.get_submodule(model.decoder_layers_path)


# ----- activation checkpointing ---------------------------------------------------------------------------------
def apply_activation_checkpointing(model: Flamingo) -> None:
    """Checkpoint every decoder layer; a layer's cross-attention block runs in its pre-hook, so each checkpointed
    unit is (gated cross-attention + decoder layer). Parameter names are unchanged (the wrapper strips its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(model)
    # The recomputation in backward must see the media the forward saw (Flamingo.checkpoint_context_fn).
    context_fn = model.checkpoint_context_fn()
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, context_fn=context_fn, preserve_rng_state=True)


# ----- torch.compile --------------------------------------------------------------------------------------------
def compile_enabled(config: RunConfig, device: torch.device) -> bool:
    """`parallel.compile`: "auto" compiles on CUDA only. On CPUs inductor takes minutes to build the kernels of a
    tiny model and the step gains nothing measurable, so there it is on only when asked for."""
    choice = config.parallel.compile
    return device.type == "cuda" if choice == "auto" else bool(choice)


def apply_compile(model: Flamingo, backend: str) -> None:
    """Compile the repeated units in place (module names and checkpoints stay the same)."""
    for block in model.cross_attn_blocks.values():
        block.compile(backend=backend, dynamic=True)
    for layer in model.perceiver.layers:
        layer.compile(backend=backend, dynamic=True)
    for layer in decoder_layers(model):
        layer.compile(backend=backend, dynamic=True)


# ----- data parallel ------------------------------------------------------------------------------------------------
def apply_fsdp(
    model: Flamingo, dist: Distributed, param_dtype: torch.dtype | None, reshard: bool
) -> nn.Module:
    """FSDP2: one unit per (decoder layer + its cross-attention block), the perceiver, the vision encoder, and the
    root (embeddings, added tokens, head). The block is grouped with its layer because the layer's pre-hook calls
    it (and reads its key/value projection directly), so both must be unsharded together.
    Frozen and trainable parameters mix freely: FSDP2 shards per parameter and reduces only existing gradients.

    On one process (a one-process group is made for it) nothing is sharded, but the mixed precision is the same as
    with several: the compute copies in `param_dtype` are made when a unit is first unsharded in a step and kept,
    not resharded, until the step's last backward (see `gradient_sync`); the fp32 weights the optimizer updates and
    the fp32 gradients are the ones FSDP keeps. `reshard` (parallel.fsdp_reshard_after_forward) applies only with
    several processes: on one, resharding frees a copy only to cast it again for the backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.enabled:
        init_single_process_group(dist.device)
        reshard = False
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    # bf16 compute with fp32 master weights and fp32 gradient reduction; also lets frozen bf16 and trainable fp32
    # parameters share a unit (FSDP2 otherwise wants one dtype per unit).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    for i, layer in enumerate(decoder_layers(model)):
        block = model.cross_attn_blocks[str(i)] if str(i) in model.cross_attn_blocks else None
        fully_shard([layer, block] if block is not None else layer, **kwargs)
    fully_shard(model.perceiver, **kwargs)
    if any(True for _ in model.vision_encoder.parameters()):
        fully_shard(model.vision_encoder, **kwargs)
    fully_shard(model, **kwargs)
    return model


def apply_ddp(model: Flamingo, dist: Distributed) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
    # Frozen backbones are identical on every rank and in eval mode: no buffer broadcast needed.
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def parallel_mode(config: RunConfig, dist: Distributed) -> str:
    """The wrapping `parallelize` applies. "fsdp" holds on one process too (its mixed-precision policy is part of
    what it does); "ddp" on one process is "none": there is nothing to synchronise."""
    mode = config.parallel.mode
    if mode == "auto":
        return "ddp" if dist.enabled else "none"
    if mode == "ddp" and not dist.enabled:
        return "none"
    if mode == "none" and dist.enabled:
        raise InputError(f"parallel.mode: 'none' with {dist.world_size} processes; use 'ddp' or 'fsdp'")
    return mode


def parallelize(model: Flamingo, config: RunConfig, dist: Distributed) -> nn.Module:
    """The model to train: `model` itself, DDP(model), or `model` sharded in place with FSDP2."""
    cast_frozen(model, frozen_dtype(config, dist.device))  # on the CPU first: half the bytes to move
    mode = parallel_mode(config, dist)
    if not dist.enabled and config.parallel.mode in ("ddp", "fsdp"):
        note = {
            "ddp": "trains the model unwrapped (nothing to synchronise)",
            "fsdp": "wraps it with FSDP2 on a one-process group, for its mixed precision; units stay unsharded "
            "through each step (parallel.fsdp_reshard_after_forward applies with several processes)",
        }
        logger.info("parallel.mode: %r on one process %s", config.parallel.mode, note[config.parallel.mode])
    if mode != "fsdp":  # fully_shard moves each rank's shards (and buffers) to the device itself
        model.to(dist.device)
    # Compile inside the checkpoint wrappers: torch.compile accepts no context_fn around a compiled region, so the
    # (eager) checkpoint calls the compiled layer rather than the other way round.
    if compile_enabled(config, dist.device):
        apply_compile(model, config.parallel.compile_backend)
    if config.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if mode == "fsdp":
        return apply_fsdp(
            model, dist, autocast_dtype(config, dist.device), config.parallel.fsdp_reshard_after_forward
        )
    if mode == "ddp":
        return apply_ddp(model, dist)
    return model


def unwrap(model: nn.Module) -> Flamingo:
    return model.module if hasattr(model, "module") and isinstance(model.module, Flamingo) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce for all but the last backward of an optimizer step. FSDP2 on one process also
    keeps its units unsharded until that last backward: their compute copies are cast once per step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        if torch.distributed.get_world_size() == 1:
            model.set_reshard_after_backward(enabled)
        yield
    elif hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    else:
        yield
