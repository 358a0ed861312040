"""No-repeat n-gram ban as a vLLM v1 logits processor.

A token is banned (logit set to -inf) when, appended to the output, it would complete an n-gram
that already occurs in the last ``gov_ngram_window`` output tokens. Only output counts: a model
quoting its prompt is not looping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams

from governor.processors.base import OutputCursor, RowStateLogitsProcessor
from governor.processors.extra_args import parse_ngram

if TYPE_CHECKING:
    from vllm.config import VllmConfig

Prefix = tuple[int, ...]


@dataclass(slots=True)
class NGramRow:
    """The n-grams of one request's output window, kept up to date as the output grows.

    ``seen`` maps each (n-1)-token prefix to the tokens that followed it, with counts so an
    n-gram can leave the window without a rescan. The counted n-grams are exactly those
    starting at output positions ``[first_start, next_start)``.
    """

    size: int
    window: int
    cursor: OutputCursor
    seen: dict[Prefix, dict[int, int]] = field(default_factory=dict)
    first_start: int = 0
    next_start: int = 0

    def _count(self, start: int, delta: int) -> None:
        out = self.cursor.output
        prefix = tuple(out[start : start + self.size - 1])
        token = out[start + self.size - 1]
        followers = self.seen.setdefault(prefix, {})
        count = followers.get(token, 0) + delta
        if count > 0:
            followers[token] = count
        else:
            followers.pop(token, None)
            if not followers:
                del self.seen[prefix]

    def sync(self) -> int:
        """Fold newly generated tokens into ``seen``; returns the settled output length."""
        reset, _, length = self.cursor.advance()
        if reset:
            self.seen.clear()
            self.first_start = self.next_start = 0
        low = max(0, length - self.window) if self.window else 0
        high = max(low, length - self.size + 1)
        # Both bounds only ever move forward, so n-grams leave at the front and enter at the back.
        for start in range(self.first_start, min(self.next_start, low)):
            self._count(start, -1)
        for start in range(max(self.next_start, low), high):
            self._count(start, +1)
        self.first_start, self.next_start = low, high
        return length

    def banned(self) -> dict[int, int] | None:
        """Tokens that would repeat an n-gram at the next position (a dict used as a set)."""
        length = self.sync()
        if length < self.size - 1 or not self.seen:
            return None
        return self.seen.get(tuple(self.cursor.output[length - self.size + 1 : length]))


class NoRepeatNGramLogitsProcessor(RowStateLogitsProcessor[NGramRow]):
    """Bans tokens that would repeat an n-gram of the request's recent output.

    Enabled per request by ``gov_ngram_size`` > 0 in ``SamplingParams.extra_args``.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self._neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=self.device)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_ngram_*`` values before the request reaches the engine."""
        parse_ngram(sampling_params.extra_args)

    def new_row(self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> NGramRow | None:
        """Track the request when it asked for a no-repeat n-gram size."""
        config = parse_ngram(params.extra_args)
        if config is None:
            return None
        return NGramRow(size=config.size, window=config.window, cursor=OutputCursor(output_ids))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of n-gram-repeating tokens to -inf."""
        if not self.rows:
            return logits
        rows: list[int] = []
        tokens: list[int] = []
        for index, row in self.rows.items():
            banned = row.banned()
            if banned:
                rows.extend([index] * len(banned))
                tokens.extend(banned)
        if tokens:
            logits.index_put_(self.index_pair(rows, tokens), self._neg_inf)
        return logits
