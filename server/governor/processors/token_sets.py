"""Distinct token-id sets (DRY breakers, penalty exemptions) shared by requests, on the logits device."""

from __future__ import annotations

from typing import Any

import torch

from governor.processors.cells import grown


class TokenSets:
    """Distinct token-id sets (DRY breakers, penalty exemptions) as rows of a device bool table.

    Requests under one preset share one set, so the table has a row per distinct set, not per request.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.table = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self.ids: dict[frozenset[int], int] = {}
        self.refs: dict[int, int] = {}
        self.free: list[int] = []

    def acquire(self, tokens: frozenset[int], upload: Any) -> int:
        """The set's row id, writing it to the device the first time it is seen."""
        index = self.ids.get(tokens)
        if index is None:
            index = self.free.pop() if self.free else len(self.ids)
            if index >= self.table.shape[0]:
                self.table = grown(self.table, (max(4, 2 * self.table.shape[0]), self.vocab_size), False)
            self.table[index] = False
            inside = sorted(t for t in tokens if t < self.vocab_size)
            if inside:
                self.table[index, upload(inside, torch.int64)] = True
            self.ids[tokens] = index
        self.refs[index] = self.refs.get(index, 0) + 1
        return index

    def release(self, index: int) -> None:
        self.refs[index] -= 1
        if not self.refs[index]:
            del self.refs[index]
            self.ids = {k: v for k, v in self.ids.items() if v != index}
            self.free.append(index)

    def contains(self, set_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per element: is ``tokens[i]`` in set ``set_ids[i]``? Ids outside the table are in no set."""
        inside = (tokens >= 0) & (tokens < self.vocab_size)
        return self.table[set_ids, tokens.clamp(0, self.vocab_size - 1)] & inside

    def member(self, set_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``contains`` for tokens known to lie inside the vocabulary."""
        return self.table[set_ids, tokens]
