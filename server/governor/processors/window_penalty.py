"""Windowed repetition penalty as a batched vLLM v1 logits processor.

HF/CTRL-style penalty (positive logits divided by ``p``, negative multiplied) applied only to the
tokens of the last ``gov_rep_window`` tokens of the request's scope (``output`` or ``all`` =
prompt + output), except ``gov_rep_exempt`` ids (digits, punctuation: a list must be able to count).

The window is read straight from the device history each step: exempt tokens are stored as -1
when they enter, and each windowed token's logit is lowered with one scatter-min, so a token seen
twice gets the same value twice and no per-token count is needed. ``reference.window_penalty`` is
the per-row original this is tested against.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams

from governor.processors.extra_args import RepPenaltyConfig, parse_rep_penalty
from governor.processors.slots import BatchedLogitsProcessor, SlotRow, Step, grown
from governor.processors.token_sets import TokenSets

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_UNBOUNDED = 1 << 40


class WindowedRepetitionPenaltyLogitsProcessor(BatchedLogitsProcessor):
    """Applies a repetition penalty to the tokens of a recent window only.

    Enabled per request by ``gov_rep_penalty`` > 1 in ``SamplingParams.extra_args``.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.sets = TokenSets(self.vocab_size, self.device)
        self.penalty = torch.zeros(0, dtype=torch.float32, device=self.device)
        self.window = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.exempt = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._seen_layout = -1
        self._widest = 0  # the largest window among the rows (0: unbounded)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_rep_*`` values before the request reaches the engine."""
        parse_rep_penalty(sampling_params.extra_args)

    def parse(self, extra_args: dict[str, Any] | None) -> RepPenaltyConfig | None:
        return parse_rep_penalty(extra_args)

    def kept_prompt(self, config: Any, prompt: list[int]) -> list[int]:
        return prompt if config.include_prompt else []

    def resize_state(self, slots: int, length: int) -> None:
        self.penalty = grown(self.penalty, (slots,))
        self.window = grown(self.window, (slots,))
        self.exempt = grown(self.exempt, (slots,))

    def configure(self, rows: list[SlotRow]) -> None:
        for row in rows:
            row.token_set = self.sets.acquire(row.config.exempt, self.host_to_device)
        ints = [row.slot for row in rows] + [row.token_set for row in rows]
        ints += [row.config.window or _UNBOUNDED for row in rows]
        slots, sets, window = self.host_to_device(ints, torch.int64).split(len(rows))
        self.penalty[slots] = self.host_to_device([row.config.penalty for row in rows], torch.float32)
        self.exempt[slots] = sets
        self.window[slots] = window

    def release_config(self, row: SlotRow) -> None:
        self.sets.release(row.token_set)

    def encode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Exempt tokens, and ids past the vocabulary, are stored as -1: the window pass skips them."""
        skipped = self.sets.contains(self.exempt[slots], tokens) | (tokens >= self.vocab_size)
        return torch.where(skipped, -1, tokens)

    def penalize(self, logits: torch.Tensor, step: Step) -> None:
        if self._seen_layout != self.layout_version:
            windows = [row.config.window for row in self.active]
            self._widest = 0 if 0 in windows else max(windows)
            self._seen_layout = self.layout_version
        width = min(step.longest, self._widest) if self._widest else step.longest
        total = self.per_slot(self.length)
        positions = total.unsqueeze(1) - self.distances[:width]  # newest first
        low = (total - self.per_slot(self.window)).clamp(min=0).unsqueeze(1)
        tokens = self.read_history(positions.clamp(min=0))
        valid = (positions >= low) & (tokens >= 0)
        tokens.clamp_(min=0)
        if logits.shape[-1] < self.vocab_size:
            valid &= tokens < logits.shape[-1]
            tokens.clamp_(max=logits.shape[-1] - 1)
        values = self.read_logits(logits, tokens)
        penalty = self.per_slot(self.penalty).unsqueeze(1).to(logits.dtype)
        lowered = torch.where(values > 0, values / penalty, values * penalty)
        self.lower_logits(logits, tokens, torch.where(valid, lowered, math.inf))
