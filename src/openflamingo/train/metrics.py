"""Throughput, model FLOPs utilisation (MFU), gate values and data-wait accounting.

FLOPs accounting (what MFU's numerator counts). We do not use the dense-LM rule of thumb 6 * N per token: most
of a Flamingo is frozen. A frozen layer still runs forward (2 FLOPs per weight per token) and, when something
trainable lies before it, backward through its activations (another 2 per weight per token: the added-token
embeddings feed the LM's first layer, so every LM layer back-propagates), but it computes no weight gradient (the
third 2 per weight that trainable layers pay). The frozen vision encoder, before anything trainable, only runs
forward. Rather than write that out per architecture, we count it: one micro-step runs under
`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and attention (2 FLOPs per
multiply-add) exactly as autograd executes them, so frozen weights' gradients, never computed, are never counted.
Elementwise ops are not counted (the usual convention). With activation checkpointing the recomputed forward is
counted too; the figure is then closer to hardware FLOPs utilisation. Padding is not useful work: we divide the
count by the sequence positions the step processed (padding included) and multiply by the real (unpadded) tokens
per second; over the peak FLOP/s of the device(s), that is the MFU we report.
"""

from __future__ import annotations

import time

import torch
from torch import nn

# Dense bf16 peak TFLOP/s per GPU (no sparsity), from the vendors' datasheets.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0}


def peak_flops(device: torch.device, configured_tflops: float) -> float:
    """Peak FLOP/s of one device: configured, looked up for known GPUs, or (CPU) measured by a short fp32 matmul,
    so MFU on a CPU says how close we get to what its GEMM achieves."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return 0.0
    return measure_cpu_matmul_flops()


def measure_cpu_matmul_flops(n: int = 1024, trials: int = 5) -> float:
    """Best of a few fp32 GEMMs: the best trial is the least disturbed by other processes on shared cores."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def _with_query_heads(query_shape, shape):
    """A key/value shape (B, H_kv, S, D) with the query's head count: grouped-query attention computes exactly
    what multi-head attention over repeated key/value heads computes."""
    return (*shape[:-3], query_shape[-3], *shape[-2:])


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    kv = (_with_query_heads(query_shape, key_shape), _with_query_heads(query_shape, value_shape))
    return sdpa_flop_count(query_shape, *kv)


def _sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    kv = (_with_query_heads(query_shape, key_shape), _with_query_heads(query_shape, value_shape))
    return sdpa_backward_flop_count(grad_out_shape, query_shape, *kv)


def _sdpa_formulas() -> dict:
    """FLOP formulas for the fused attention kernels that handle grouped-query attention (torch before 2.12
    rejects its shapes, and does not count the CPU kernel at all)."""
    aten = torch.ops.aten
    forward = ["_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"]
    forward += ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    formulas = {}
    for name in forward:
        for op, formula in ((name, _sdpa_flops), (f"{name}_backward", _sdpa_backward_flops)):
            if hasattr(aten, op):
                formulas[getattr(aten, op)] = formula
    return formulas


def count_flops():
    """Context manager counting FLOPs of what runs inside it (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_sdpa_formulas())


def gate_values(model: nn.Module) -> dict[str, list[float]]:
    """tanh of every cross-attention block's attention and feed-forward gate, in layer order (collective under
    FSDP: every rank must call it)."""
    attn, ff = [], []
    for name, param in model.named_parameters():
        if name.endswith(("attn_gate", "ff_gate")) and "cross_attn_blocks" in name:
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            (attn if name.endswith("attn_gate") else ff).append(
                float(value.detach().float().tanh().reshape(-1)[0])
            )
    return {"attn": attn, "ff": ff}


class Throughput:
    """Timing over a window of steps: wall time, time blocked on the data loader, tokens; and MFU from FLOPs per
    token. Measured over windows, not single steps: a step only launches device work, so its wall time says when
    the host finished launching, not when the device finished computing."""

    def __init__(self, peak_flops_per_device: float, world_size: int):
        self.peak = peak_flops_per_device * world_size
        self.flops_per_token: float | None = None

    def summary(self, tokens: float, seconds: float, data_seconds: float, steps: int) -> dict[str, float]:
        """Rates over `steps` optimizer steps that took `seconds` in all, `data_seconds` of it waiting for data."""
        tokens_per_s = tokens / max(seconds, 1e-9)
        out = {
            "tokens_per_s": tokens_per_s,
            "step_time_s": seconds / max(steps, 1),
            "data_wait_frac": data_seconds / max(seconds, 1e-9),
        }
        if self.flops_per_token is not None and self.peak > 0:
            out["mfu"] = self.flops_per_token * tokens_per_s / self.peak
        return out
