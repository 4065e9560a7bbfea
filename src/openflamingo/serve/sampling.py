"""Next-token choice per row of a batch: greedy, or temperature + nucleus (top-p) sampling from the row's own RNG.

Each answer owns a `torch.Generator` seeded from the request's `seed` and the answer's index, and samples on the
CPU from float32 probabilities: its draws do not depend on which other requests share the batch or on the device.
A temperature below GREEDY_BELOW is greedy (as vLLM does): dividing by it would overflow the logits.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5
log = logging.getLogger("openflamingo.serve")


@dataclass
class Sampling:
    temperature: float  # 0: greedy
    top_p: float
    generator: torch.Generator | None = None  # None when greedy

    @classmethod
    def for_choice(cls, temperature: float, top_p: float, seed: int | None, index: int) -> Sampling:
        if temperature < GREEDY_BELOW:
            return cls(0.0, top_p)
        base = secrets.randbits(62) if seed is None else seed
        # A fixed seed gives answer `index` the same stream every time; different answers get different streams.
        generator = torch.Generator().manual_seed((base * 1_000_003 + index) % 2**63)
        return cls(temperature, top_p, generator)


def next_tokens(logits: torch.Tensor, rows: list[Sampling]) -> list[int | None]:
    """logits (B, V) of the last position -> one token id per row; None for a row whose sampling failed (its
    request fails alone, the other rows go on)."""
    logits = logits.float()
    tokens: list[int | None] = logits.argmax(dim=-1).tolist()  # greedy rows, as HF generate picks them
    sampled = [i for i, row in enumerate(rows) if row.temperature > 0]
    if sampled:
        host = logits[sampled].cpu()
        for j, i in enumerate(sampled):
            try:
                tokens[i] = _sample(host[j], rows[i])
            except RuntimeError:  # e.g. non-finite probabilities
                log.exception(
                    "sampling failed (temperature %s, top_p %s)", rows[i].temperature, rows[i].top_p
                )
                tokens[i] = None
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
