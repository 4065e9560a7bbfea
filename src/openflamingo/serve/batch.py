"""The rows being decoded together: what each row is, the token it feeds next, and their `DecodeState`.

Requests join after their own prefill and leave as soon as they finish, so the batch changes on membership only:
joining left-pads the shorter cache to the longer one's length (and the image axis to the larger image count;
padding images are never attended), leaving selects rows and drops the columns that every remaining row has as
padding. Each decode step (`Flamingo.decode_step`) then appends one column in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.decoding import DecodeState


@dataclass
class Batch:
    rows: list[Any] = field(default_factory=list)  # what each row is (the engine's Row), in batch order
    state: DecodeState | None = None  # None while the batch is empty
    next_tokens: torch.Tensor | None = None  # (B,) the token each row feeds next

    def __len__(self) -> int:
        return len(self.rows)

    def repeat(self, answers: list[int]) -> None:
        """Prefilled prompts (one row each) as rows for their answers: row b repeated answers[b] times (a request's
        `n` answers share one prefill)."""
        if any(a != 1 for a in answers):
            device = self.state.mask.device
            index = torch.arange(len(answers), device=device).repeat_interleave(
                torch.tensor(answers, device=device)
            )
            self.state.select_rows(index)

    def join(self, other: Batch) -> None:
        """Append `other`'s rows (both batches of the same kind: with images or without)."""
        if not self.rows:
            self.__dict__.update(other.__dict__)
            return
        self.state.concatenate(other.state)
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.rows = self.rows + other.rows

    def keep(self, indices: list[int]) -> None:
        """Only the rows at `indices` stay; columns that are padding in all of them are dropped."""
        if not indices:
            self.__dict__.update(Batch().__dict__)
            return
        index = torch.tensor(indices, device=self.state.mask.device)
        self.state.select_rows(index)
        self.state.drop_padding_columns()
        self.next_tokens = self.next_tokens.index_select(0, index)
        self.rows = [self.rows[i] for i in indices]
