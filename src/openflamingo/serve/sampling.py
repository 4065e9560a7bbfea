"""Next-token choice per row of a batch: greedy, or temperature + nucleus (top-p) sampling from the row's own RNG.

Each answer owns a `torch.Generator` seeded from the request's `seed` and the answer's index, and samples on the
CPU from float32 probabilities: its draws do not depend on which other requests share the batch or on the device.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float  # 0: greedy
    top_p: float
    generator: torch.Generator | None = None  # None when greedy

    @classmethod
    def for_choice(cls, temperature: float, top_p: float, seed: int | None, index: int) -> Sampling:
        if temperature == 0:
            return cls(0.0, top_p)
        base = secrets.randbits(62) if seed is None else seed
        # A fixed seed gives answer `index` the same stream every time; different answers get different streams.
        generator = torch.Generator().manual_seed((base * 1_000_003 + index) % 2**63)
        return cls(temperature, top_p, generator)


def next_tokens(logits: torch.Tensor, rows: list[Sampling]) -> list[int]:
    """logits (B, V) of the last position -> one token id per row."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()  # greedy rows, as HF generate picks them
    sampled = [i for i, row in enumerate(rows) if row.temperature > 0]
    if sampled:
        host = logits[sampled].cpu()
        for j, i in enumerate(sampled):
            tokens[i] = _sample(host[j], rows[i])
    return tokens


def _sample(logits: torch.Tensor, row: Sampling) -> int:
    probs = torch.softmax(logits / row.temperature, dim=-1)
    if row.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=row.generator))
    ordered, order = probs.sort(descending=True)
    # Keep the smallest set of most likely tokens whose mass reaches top_p (always at least the first).
    keep = (ordered.cumsum(0) - ordered) < row.top_p
    keep[0] = True
    choice = torch.multinomial(ordered * keep, 1, generator=row.generator)
    return int(order[choice])
