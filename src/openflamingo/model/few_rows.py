"""Decode-step matrix products on CPUs: `x @ W.T` for a few rows of `x`, computed as `(W @ x.T).T`.

A decode step multiplies every weight matrix by a handful of rows (one per sequence). CPU BLAS libraries pick a
slow kernel for that transposed-weight shape: on the 2-core x86 machines this project runs on (MKL/OpenBLAS via
torch 2.13), 4 rows through a 32000 x 512 LM head took 6.9 ms as `F.linear` and 1.9 ms as `W @ x.T`, and decode steps
of an 8 x 512 Llama ran in 13.4 instead of 25.1 ms, same tokens. That was an AMD EPYC; on an Intel Xeon the same
torch's `F.linear` is as fast for the head (2.9 vs 3.0 ms) and twice as fast for the layers (0.09 vs 0.17 ms, 2048 x
512), so the products are reordered only on AMD CPUs. GPUs have no such gap.
The product is the same sum in another order: results agree to rounding, not bitwise.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_ROWS = 16  # measured: the gain fades above it (and single rows take the matrix-vector path either way)


class FewRowLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // max(x.shape[-1], 1)
            if 1 < rows <= MAX_ROWS and weight.ndim == 2 and x.device.type == "cpu":
                # A transposed input (the output of an earlier reordered product) would make x.T contiguous: the
                # slow kernel again (642 vs 153 us for 4 rows through 512 x 2048 on an AMD EPYC).
                x2d = x.reshape(rows, x.shape[-1]).contiguous()
                out = (weight @ x2d.T).T.contiguous().reshape(*x.shape[:-1], weight.shape[0])
                return out if bias is None else out + bias
        return func(*args, **kwargs)


@functools.cache
def reordering_pays() -> bool:
    """Whether this CPU is one where `F.linear` of a few rows is the slow kernel (AMD's; from the CPU's vendor, not
    a timing, so that a rerun computes the same products)."""
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def few_row_products(device: torch.device) -> AbstractContextManager:
    """The context to run decode steps in on `device`."""
    return FewRowLinear() if device.type == "cpu" and reordering_pays() else nullcontext()
