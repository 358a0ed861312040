"""No-repeat n-gram ban as a batched vLLM v1 logits processor.

A token is banned (logit set to -inf) when, appended to the output, it would complete an n-gram
that already occurs in the last ``gov_ngram_window`` output tokens. Only output counts: a model
quoting its prompt is not looping.

It is DRY's match with a fixed length: the token after an earlier position is banned when the
``n - 1`` tokens ending there equal the last ``n - 1`` tokens of the output, i.e. when that
position's match length (``SuffixMatch``, capped at ``n - 1``) reaches ``n - 1``.
``reference.ngram`` is the per-row original this is tested against.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams

from governor.processors.cells import UNBOUNDED, grown
from governor.processors.extra_args import NGramConfig, parse_ngram
from governor.processors.slots import BatchedLogitsProcessor, SlotRow, Step
from governor.processors.suffix_match import SuffixMatch

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_MAX_CAP = 32767  # the match state is int16; an n-gram longer than that never fits a context anyway


def ngram_need(config: NGramConfig) -> int:
    """Match length (n - 1) at which the token after an earlier position completes a repeated n-gram."""
    return min(config.size - 1, _MAX_CAP)


def ngram_reach(config: NGramConfig) -> int:
    """How far back (in positions before the newest token) an n-gram's prefix may end inside the window: the
    n-gram after column c starts at c - (n - 2), inside a window w iff c >= now - (w - (n - 1))."""
    return min(config.window or UNBOUNDED, UNBOUNDED) - ngram_need(config)


class NoRepeatNGramLogitsProcessor(BatchedLogitsProcessor):
    """Bans tokens that would repeat an n-gram of the request's recent output.

    Enabled per request by ``gov_ngram_size`` > 0 in ``SamplingParams.extra_args``.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.matches = SuffixMatch(self.device)
        self.need = torch.zeros(0, dtype=torch.int16, device=self.device)  # n - 1
        self.reach = torch.zeros(0, dtype=torch.int32, device=self.device)  # window - (n - 1)
        self._seen_layout = -1
        self._widest = self._narrowest = UNBOUNDED  # the largest and smallest reach among the rows
        self._cap = 0  # the largest n - 1 among the rows

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_ngram_*`` values before the request reaches the engine."""
        parse_ngram(sampling_params.extra_args)

    def parse(self, extra_args: dict[str, Any] | None) -> NGramConfig | None:
        return parse_ngram(extra_args)

    def kept_prompt(self, config: Any, prompt: list[int]) -> list[int]:
        return []

    def resize_state(self, slots: int, columns: int, src: int, dst: int, count: int) -> None:
        self.matches.resize(slots, columns, src, dst, count)
        if slots > self.need.shape[0]:
            self.need = grown(self.need, (slots,))
            self.reach = grown(self.reach, (slots,))

    def configure(self, rows: list[SlotRow]) -> None:
        ints = [row.slot for row in rows] + [ngram_need(row.config) for row in rows]
        ints += [ngram_reach(row.config) for row in rows]
        slots, need, reach = self.host_to_device(ints, torch.int64).split(len(rows))
        self.need[slots] = need.to(torch.int16)
        self.reach[slots] = reach.to(torch.int32)

    def penalize(self, logits: torch.Tensor, step: Step) -> None:
        if self._seen_layout != self.layout_version:
            reaches = [ngram_reach(row.config) for row in self.active]
            self._widest, self._narrowest = max(reaches), min(reaches)
            self._cap = min(_MAX_CAP, max(row.config.size for row in self.active) - 1)
            self._seen_layout = self.layout_version
        # Earlier n-gram prefixes end at distances 1..t+1 (for n = 1 the "prefix" before the first
        # token counts too), and only where the n-gram lies in the window.
        width = min(step.longest, self._widest)
        match = self.matches.update(self, step, width, self._cap)
        if match is None:
            return
        now = step.now
        tokens, alive = self.targets(logits, now - width + 1, now + 1)
        # 1 where the n-gram repeats: the prefix matched n - 1 tokens (int16 arithmetic, no masks).
        banned = (match - self.per_slot(self.need).unsqueeze(1)).add_(1).clamp_(0, 1) * alive
        if self._narrowest < width:
            banned *= self.columns[:width] >= (width - self.per_slot(self.reach)).unsqueeze(1)
        tokens = self.cache_friendly(logits, tokens, banned)  # almost no cell bans
        # (0.5 - 1) * inf = -inf bans, (0.5 - 0) * inf = +inf leaves the logit as it is.
        values = banned.sub_(0.5).mul_(-math.inf)
        self.lower_logits(logits, tokens, values.to(logits.dtype))
