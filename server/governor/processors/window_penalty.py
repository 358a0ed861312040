"""Windowed repetition penalty as a batched vLLM v1 logits processor.

HF/CTRL-style penalty (positive logits divided by ``p``, negative multiplied) applied only to the
tokens of the last ``gov_rep_window`` tokens of the request's scope (``output`` or ``all`` =
prompt + output), except ``gov_rep_exempt`` ids (digits, punctuation: a list must be able to count).

The window is a slice of the aligned device history each step: exempt tokens are stored as dead
cells when they enter, and each windowed token's logit is lowered with one scatter-min, so a
token seen twice gets the same value twice and no per-token count is needed. ``reference.window_penalty`` is
the per-row original this is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams

from governor.processors.cells import EMPTY, UNBOUNDED, grown, outside_keys
from governor.processors.extra_args import RepPenaltyConfig, parse_rep_penalty
from governor.processors.slots import BatchedLogitsProcessor, SlotRow, Step
from governor.processors.token_sets import TokenSets

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class WindowedRepetitionPenaltyLogitsProcessor(BatchedLogitsProcessor):
    """Applies a repetition penalty to the tokens of a recent window only.

    Enabled per request by ``gov_rep_penalty`` > 1 in ``SamplingParams.extra_args``.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.sets = TokenSets(self.vocab_size, self.device)
        self.penalty = torch.zeros(0, dtype=torch.float32, device=self.device)
        self.window_of = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.exempt = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._seen_layout = -1
        self._widest = self._narrowest = UNBOUNDED  # the largest and smallest window among the rows

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_rep_*`` values before the request reaches the engine."""
        parse_rep_penalty(sampling_params.extra_args)

    def parse(self, extra_args: dict[str, Any] | None) -> RepPenaltyConfig | None:
        return parse_rep_penalty(extra_args)

    def kept_prompt(self, config: Any, prompt: list[int]) -> list[int]:
        return prompt if config.include_prompt else []

    def resize_state(self, slots: int, columns: int, src: int, dst: int, count: int) -> None:
        if slots > self.penalty.shape[0]:
            self.penalty = grown(self.penalty, (slots,))
            self.window_of = grown(self.window_of, (slots,))
            self.exempt = grown(self.exempt, (slots,))

    def configure(self, rows: list[SlotRow]) -> None:
        for row in rows:
            row.token_set = self.sets.acquire(row.config.exempt, self.host_to_device)
        ints = [row.slot for row in rows] + [row.token_set for row in rows]
        ints += [min(row.config.window or UNBOUNDED, UNBOUNDED) for row in rows]
        slots, sets, window = self.host_to_device(ints, torch.int64).split(len(rows))
        self.penalty[slots] = self.host_to_device([row.config.penalty for row in rows], torch.float32)
        self.exempt[slots] = sets
        self.window_of[slots] = window.to(torch.int32)

    def release_config(self, row: SlotRow) -> None:
        self.sets.release(row.token_set)

    def encode(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Exempt tokens, and ids past the vocabulary, are stored as ``EMPTY``: dead, never lowered."""
        skipped = self.sets.contains(self.exempt[slots], tokens) | (tokens >= self.vocab_size)
        return torch.where(skipped, EMPTY, outside_keys(tokens, self.vocab_size))

    def encode_newest(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.where(self.sets.member(self.per_slot(self.exempt), tokens), EMPTY, tokens.to(torch.int32))

    def penalize(self, logits: torch.Tensor, step: Step) -> None:
        if self._seen_layout != self.layout_version:
            windows = [min(row.config.window or UNBOUNDED, UNBOUNDED) for row in self.active]
            self._widest, self._narrowest = max(windows), min(windows)
            self._seen_layout = self.layout_version
        width = min(step.longest, self._widest)
        start, stop = step.now - width + 1, step.now + 1
        tokens, alive = self.targets(logits, start, stop)
        if self._narrowest < width:
            # Rows with a smaller window than the slice: column j is in row i's window iff j >= width - w_i.
            alive = alive * (self.columns[:width] >= (width - self.per_slot(self.window_of)).unsqueeze(1))
        values = self.read_logits(logits, tokens)
        # Per cell: the row's penalty where it applies, exactly 1 (no change) elsewhere.
        penalty = (alive * (self.per_slot(self.penalty) - 1.0).unsqueeze(1)).add_(1.0).to(logits.dtype)
        # With penalty >= 1, min(x / p, x * p) is x / p for positive x and x * p for negative x.
        self.lower_logits(logits, tokens, torch.minimum(values / penalty, values * penalty))
