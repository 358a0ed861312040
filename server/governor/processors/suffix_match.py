"""Match lengths against the newest token, kept per slot and distance on the device.

``match[slot, d - 1]`` is how many tokens, counting backwards, the text ending ``d`` positions
before a slot's newest token has in common with the text ending at the newest token (capped per
slot). DRY reads it as the length of the repeat that the token after that earlier position would
extend; the no-repeat n-gram ban is the same question with a fixed length (``>= n - 1``).

When a token is appended at position t, every entry either extends by one or resets:
``match_t(d) = match_{t-1}(d) + 1`` if ``token[t - d] == token[t]`` else 0, with no shift because
entries are indexed by distance, not position. That is a handful of elementwise ops over
[rows, width], whatever the batch. A slot whose history was rewritten is recomputed from scratch
(``rebuild``), which costs ``cap`` times more but happens once per request or after dropped tokens.
"""

from __future__ import annotations

import torch

from governor.processors.slots import grown

# Cells (rows x distances x lookback) one rebuild chunk may touch: bounds its temporary memory.
_REBUILD_CELLS = 1 << 22


class SuffixMatch:
    """The [slots, length] match-length state and its two updates."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.match = torch.zeros((0, 0), dtype=torch.int16, device=device)
        self.cap = torch.zeros(0, dtype=torch.int16, device=device)

    def resize(self, slots: int, length: int) -> None:
        """Grow to ``slots`` x ``length`` (new cells are 0: no match, which is right for new distances)."""
        self.match = grown(self.match, (slots, length))
        self.cap = grown(self.cap, (slots,))

    def advance(self, history: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                distances: torch.Tensor, width: int) -> None:  # fmt: skip
        """Fold in one new token per slot (``keys`` at ``positions``), for any set of slots.

        ``width`` must cover every distance a slot still needs; farther entries keep stale values
        that no reader looks at (entries beyond a slot's own length stay 0, which ``rebuild`` sets).
        """
        back = positions.unsqueeze(1) - distances[:width]
        earlier = history[slots.unsqueeze(1), back.clamp(min=0)]
        same = (earlier == keys.unsqueeze(1)) & (back >= 0)
        self.match[slots, :width] = self.extend(self.match[slots, :width], same, self.cap[slots])

    @staticmethod
    def extend(old: torch.Tensor, same: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        """The matches after one token: ``old + 1`` (at most ``cap``) where the token recurs, else 0."""
        return torch.minimum(old + 1, cap.unsqueeze(1)).mul_(same)

    def rebuild(self, history: torch.Tensor, length: torch.Tensor, slots: torch.Tensor, distances: torch.Tensor,
                width: int, lookback: int) -> None:  # fmt: skip
        """Recompute the slots' matches from their history; ``lookback`` >= every slot's cap."""
        count = slots.shape[0]
        self.match[slots] = 0
        if lookback <= 0 or width <= 0:
            return
        steps = torch.arange(lookback, device=self.device)
        chunk = max(1, _REBUILD_CELLS // (width * lookback))
        for first in range(0, count, chunk):
            part = slots[first : first + chunk]
            back = (length[part] - 1).unsqueeze(1) - steps  # positions t, t-1, …
            suffix = history[part.unsqueeze(1), back.clamp(min=0)]
            earlier_at = back.unsqueeze(1) - distances[:width].view(1, -1, 1)  # [rows, width, lookback]
            earlier = history[part.view(-1, 1, 1), earlier_at.clamp(min=0)]
            same = (earlier == suffix.unsqueeze(1)) & (earlier_at >= 0)
            run = same.to(torch.int16).cumprod(2).sum(2)
            self.match[part, :width] = torch.minimum(run, self.cap[part].unsqueeze(1)).to(torch.int16)
