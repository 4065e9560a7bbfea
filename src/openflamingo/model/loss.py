"""The training loss without the logits: next-token cross-entropy over the LM head, a chunk of positions at a time.

A batch's logits are (positions x vocabulary) floats, with their log-softmax and gradient as many again: 1.6 GB for
4096 positions of a 32k vocabulary in fp32, the largest tensors of a small model's step. Here a chunk's logits exist
only while it is processed, and the gradient is computed right then (softmax minus one-hot, times the head), so
backward neither keeps nor recomputes any logits: it scales the gradients already there. Flamingo's added tokens are
folded into the log-sum-exp instead of being concatenated to the LM's logits:

    loss_i = logaddexp(logsumexp(base_i), logsumexp(added_i)) - logit_i[target_i]

which is the cross-entropy over the concatenated logits, to rounding. Matrix products run in the autocast dtype when
autocast is on (as the head's own F.linear would), the softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .language import AddedTokenEmbeddings

CHUNK_POSITIONS = 1024  # 128 MB of fp32 logits per chunk at a 32k vocabulary


def cross_entropy_sum(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Linear,
    added: AddedTokenEmbeddings,
    chunk: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of the next-token predictions from `hidden` (N, D) against `targets` (N,), over the
    LM's vocabulary (`head`) and the added tokens; the logits of `chunk` (CHUNK_POSITIONS) positions at a time."""
    chunk = chunk or CHUNK_POSITIONS
    added_weight = added.input if added.tied else added.output
    compute = (
        torch.get_autocast_dtype(hidden.device.type)
        if torch.is_autocast_enabled(hidden.device.type)
        else None
    )
    return _ChunkedCrossEntropy.apply(
        hidden, targets, head.weight, head.bias, added_weight, added.output_bias, added.first_added, chunk, compute,
        torch.is_grad_enabled(),
    )  # fmt: skip


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, targets, weight, bias, added_weight, added_bias, first, chunk, compute, grad_enabled
    ):
        dtype = compute or hidden.dtype
        needs = [grad_enabled and wanted for wanted in ctx.needs_input_grad]
        with torch.autocast(hidden.device.type, enabled=False):
            base_weight = weight[:first].to(dtype)
            base_bias = None if bias is None else bias[:first].to(dtype)
            extra_weight = added_weight.to(dtype)
            extra_bias = None if added_bias is None else added_bias.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grads = {
                name: torch.zeros_like(tensor, dtype=torch.float32)
                for name, tensor, wanted in [
                    ("hidden", hidden, needs[0]),
                    ("weight", weight, needs[2]),
                    ("bias", bias, needs[3]),
                    ("added_weight", added_weight, needs[4]),
                    ("added_bias", added_bias, needs[5]),
                ]
                if wanted
            }
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                h, t = hidden[rows].to(dtype), targets[rows]
                base = F.linear(h, base_weight, base_bias).float()
                extra = F.linear(h, extra_weight, extra_bias).float()
                is_added = t >= first
                base_target = base.gather(1, t.clamp(max=first - 1)[:, None]).squeeze(1)
                added_target = extra.gather(1, (t - first).clamp(min=0)[:, None]).squeeze(1)
                # The softmax in place, over both parts of the vocabulary: a chunk's logits are the largest tensors
                # here, and on CPUs each new one of them costs more (fresh pages) than the arithmetic on it.
                shift = torch.maximum(base.amax(-1, keepdim=True), extra.amax(-1, keepdim=True))
                base_grad, extra_grad = base.sub_(shift).exp_(), extra.sub_(shift).exp_()
                normaliser = base_grad.sum(-1, keepdim=True) + extra_grad.sum(-1, keepdim=True)
                log_normaliser = (shift + normaliser.log()).squeeze(1)
                total += (log_normaliser - torch.where(is_added, added_target, base_target)).sum()
                if not grads:
                    continue
                # d loss / d logits = softmax - one-hot(target).
                base_grad.div_(normaliser)
                extra_grad.div_(normaliser)
                # Subtracting the one-hot by scatter, not by boolean indexing, which would wait for the device.
                base_grad.scatter_add_(1, t.clamp(max=first - 1)[:, None], -(~is_added).float()[:, None])
                extra_grad.scatter_add_(1, (t - first).clamp(min=0)[:, None], -is_added.float()[:, None])
                base_grad, extra_grad = base_grad.to(dtype), extra_grad.to(dtype)
                if "hidden" in grads:
                    grads["hidden"][rows] = base_grad @ base_weight + extra_grad @ extra_weight
                if "weight" in grads:
                    grads["weight"][:first] += base_grad.T @ h
                if "bias" in grads:
                    grads["bias"][:first] += base_grad.sum(0)
                if "added_weight" in grads:
                    grads["added_weight"] += extra_grad.T @ h
                if "added_bias" in grads:
                    grads["added_bias"] += extra_grad.sum(0)
        ctx.grads = grads
        ctx.dtypes = {"hidden": hidden.dtype, "weight": weight.dtype, "added_weight": added_weight.dtype}
        if bias is not None:
            ctx.dtypes["bias"] = bias.dtype
        if added_bias is not None:
            ctx.dtypes["added_bias"] = added_bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        def scaled(name: str) -> torch.Tensor | None:
            grad = ctx.grads.get(name)
            return None if grad is None else (grad * grad_total).to(ctx.dtypes[name])

        names = ("hidden", None, "weight", "bias", "added_weight", "added_bias", None, None, None, None)
        return tuple(None if name is None else scaled(name) for name in names)
