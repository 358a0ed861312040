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

from governor.processors.extra_args import NGramConfig, parse_ngram
from governor.processors.slots import BatchedLogitsProcessor, SlotRow, Step, grown
from governor.processors.suffix_match import SuffixMatch

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_UNBOUNDED = 1 << 40
_MAX_CAP = 32767  # the match state is int16; an n-gram longer than that never fits a context anyway


class NoRepeatNGramLogitsProcessor(BatchedLogitsProcessor):
    """Bans tokens that would repeat an n-gram of the request's recent output.

    Enabled per request by ``gov_ngram_size`` > 0 in ``SamplingParams.extra_args``.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.matches = SuffixMatch(self.device)
        self.need = torch.zeros(0, dtype=torch.int64, device=self.device)  # n - 1
        self.window = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._seen_layout = -1
        self._widest = 0  # the largest window among the rows (0: unbounded)
        self._lookback = 0  # the largest n - 1 among the rows

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_ngram_*`` values before the request reaches the engine."""
        parse_ngram(sampling_params.extra_args)

    def parse(self, extra_args: dict[str, Any] | None) -> NGramConfig | None:
        return parse_ngram(extra_args)

    def kept_prompt(self, config: Any, prompt: list[int]) -> list[int]:
        return []

    def resize_state(self, slots: int, length: int) -> None:
        self.matches.resize(slots, length)
        self.need = grown(self.need, (slots,))
        self.window = grown(self.window, (slots,))

    def configure(self, rows: list[SlotRow]) -> None:
        ints = [row.slot for row in rows] + [min(row.config.size - 1, _MAX_CAP) for row in rows]
        ints += [row.config.window or _UNBOUNDED for row in rows]
        slots, need, window = self.host_to_device(ints, torch.int64).split(len(rows))
        self.need[slots] = need
        self.window[slots] = window
        self.matches.cap[slots] = need.to(torch.int16)

    def encode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Ids past the vocabulary become -(id + 2**40): they still match each other, but have no logit."""
        return torch.where(tokens >= self.vocab_size, -(tokens + _UNBOUNDED), tokens)

    def penalize(self, logits: torch.Tensor, step: Step) -> None:
        if self._seen_layout != self.layout_version:
            windows = [row.config.window for row in self.active]
            self._widest = 0 if 0 in windows else max(windows)
            self._lookback = min(_MAX_CAP, max(row.config.size for row in self.active) - 1)
            self._seen_layout = self.layout_version
        # Distances 1..t+1 matter (for n = 1 even the first token), and only within the window.
        width = min(step.longest, self._widest) if self._widest else step.longest
        matches, distances = self.matches, self.distances
        if not step.fast:
            if step.appended is not None:
                matches.advance(self.history, *step.appended, distances, width)
            if step.rewritten is not None:
                matches.rebuild(self.history, self.length, step.rewritten, distances, width, self._lookback)
        newest = step.appended[2] if step.fast and step.appended else self.per_slot(self.length) - 1
        back = newest.unsqueeze(1) - distances[:width]  # where each earlier n-gram prefix ends
        match = self.slot_block(matches.match, width)
        if step.fast and step.appended:
            same = (self.read_history(back.clamp(min=0)) == step.appended[1].unsqueeze(1)) & (back >= 0)
            match = matches.extend(match, same, self.per_slot(matches.cap))
            self.write_per_slot(matches.match, width, match)
        low = (newest + 1 - self.per_slot(self.window)).clamp(min=0).unsqueeze(1)
        need = self.per_slot(self.need).unsqueeze(1)
        # The n-gram that ends after `back` starts at back - need + 1: it must lie in the window.
        valid = (match >= need) & (back >= low + need - 1) & (back >= -1)
        following = self.read_history((back + 1).clamp(min=0))
        valid &= following >= 0
        tokens = following.clamp(min=0)
        if logits.shape[-1] < self.vocab_size:
            valid &= tokens < logits.shape[-1]
            tokens.clamp_(max=logits.shape[-1] - 1)
        banned = torch.full((), -math.inf, dtype=logits.dtype, device=logits.device)
        self.lower_logits(logits, tokens, torch.where(valid, banned, math.inf))
