"""DRY ("Don't Repeat Yourself") sampler as a batched vLLM v1 logits processor.

p-e-w's algorithm as implemented in text-generation-webui and koboldcpp: for every earlier
occurrence of the context's last token, measure how far the text before it matches the text
before the end of the context; the token that followed that occurrence would extend a repeat of
that length L, so when L >= allowed_length it loses ``multiplier * base ** (L - allowed_length)``
from its logit. Sequence-breaker tokens end a match. The context is prompt + output.

The match lengths live on the device (``SuffixMatch``) and grow or reset with each token; a step
is a fixed number of tensor ops over [rows, context]. Breakers are stored in the history as a
value unique to their position, so they can never be part of a match. ``reference.dry`` is the
per-row original this is tested against.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams

from governor.processors.extra_args import DRYConfig, parse_dry
from governor.processors.slots import BatchedLogitsProcessor, SlotRow, Step, grown
from governor.processors.suffix_match import SuffixMatch
from governor.processors.token_sets import TokenSets

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# Longest match measured. Bounds the state and keeps base ** L finite; the reference
# implementations use the same cap.
MAX_MATCH_LENGTH = 50
_UNBOUNDED = 1 << 40


def penalty_scale(config: DRYConfig) -> list[float]:
    """Penalty by match length, 0..MAX_MATCH_LENGTH; overflow becomes inf, i.e. a ban."""
    scale = [0.0] * (MAX_MATCH_LENGTH + 1)
    for length in range(config.allowed_length, MAX_MATCH_LENGTH + 1):
        try:
            scale[length] = config.multiplier * config.base ** (length - config.allowed_length)
        except OverflowError:
            scale[length] = math.inf
    return scale


class DRYLogitsProcessor(BatchedLogitsProcessor):
    """Penalises tokens that would extend a verbatim repeat of earlier context.

    Enabled per request by ``gov_dry_multiplier`` > 0 in ``SamplingParams.extra_args``.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.sets = TokenSets(self.vocab_size, self.device)
        self.matches = SuffixMatch(self.device)
        self.scale = torch.zeros((0, MAX_MATCH_LENGTH + 1), dtype=torch.float32, device=self.device)
        self.range = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.breakers = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._seen_layout = -1
        self._widest = 0  # the largest range among the rows (0: unbounded)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_dry_*`` values before the request reaches the engine."""
        parse_dry(sampling_params.extra_args)

    def parse(self, extra_args: dict[str, Any] | None) -> DRYConfig | None:
        return parse_dry(extra_args)

    def resize_state(self, slots: int, length: int) -> None:
        self.matches.resize(slots, length)
        self.scale = grown(self.scale, (slots, MAX_MATCH_LENGTH + 1))
        self.range = grown(self.range, (slots,))
        self.breakers = grown(self.breakers, (slots,))

    def configure(self, rows: list[SlotRow]) -> None:
        for row in rows:
            row.token_set = self.sets.acquire(row.config.breakers, self.host_to_device)
        ints = [row.slot for row in rows] + [row.token_set for row in rows]
        ints += [row.config.range or _UNBOUNDED for row in rows]
        slots, sets, ranges = self.host_to_device(ints, torch.int64).split(len(rows))
        scales = [value for row in rows for value in penalty_scale(row.config)]
        self.scale[slots] = self.host_to_device(scales, torch.float32).view(len(rows), -1)
        self.breakers[slots] = sets
        self.range[slots] = ranges
        self.matches.cap[slots] = MAX_MATCH_LENGTH

    def release_config(self, row: SlotRow) -> None:
        self.sets.release(row.token_set)

    def encode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Breakers become -(position + 2): unique, so they match nothing and are never penalised.
        Ids past the vocabulary (a client's tokenizer) become -(id + 2**40): they still match each
        other, but have no logit to lower."""
        breaker = self.sets.contains(self.breakers[slots], tokens)
        keys = torch.where(tokens >= self.vocab_size, -(tokens + _UNBOUNDED), tokens)
        return torch.where(breaker, -(positions + 2), keys)

    def penalize(self, logits: torch.Tensor, step: Step) -> None:
        if self._seen_layout != self.layout_version:
            ranges = [row.config.range for row in self.active]
            self._widest = 0 if 0 in ranges else max(ranges)
            self._seen_layout = self.layout_version
        # Distances 1..t matter, and within a range r only those below r.
        width = step.longest - 1
        if self._widest:
            width = min(width, self._widest - 1)
        matches, distances = self.matches, self.distances
        if not step.fast:
            if step.appended is not None and width > 0:
                matches.advance(self.history, *step.appended, distances, width)
            if step.rewritten is not None:
                matches.rebuild(self.history, self.length, step.rewritten, distances, width, MAX_MATCH_LENGTH)
        if width <= 0:
            return
        newest = step.appended[2] if step.fast and step.appended else self.per_slot(self.length) - 1
        # History at positions t, t-1, ..., t-width in one gather: entry d (>= 1) is where an earlier
        # occurrence ends, entry d - 1 the token that followed it.
        positions = newest.unsqueeze(1) - (distances[: width + 1] - 1)
        history = self.read_history(positions.clamp(min=0))
        back, following = positions[:, 1:], history[:, :-1]
        match = self.slot_block(matches.match, width)
        if step.fast and step.appended:
            same = (history[:, 1:] == step.appended[1].unsqueeze(1)) & (back >= 0)
            match = matches.extend(match, same, self.per_slot(matches.cap))
            self.write_per_slot(matches.match, width, match)
        # The match may not reach back before the range's start (reference: the context is cut there).
        reach = (1 - (newest + 1 - self.per_slot(self.range)).clamp(min=0)).unsqueeze(1)
        length = torch.minimum(match, back + reach).clamp_(0, MAX_MATCH_LENGTH)
        penalty = self.per_slot(self.scale).gather(1, length)
        valid = (penalty > 0) & (following >= 0)
        tokens = following.clamp(min=0)
        if logits.shape[-1] < self.vocab_size:
            valid &= tokens < logits.shape[-1]
            tokens.clamp_(max=logits.shape[-1] - 1)
        lowered = self.read_logits(logits, tokens) - penalty.to(logits.dtype)
        self.lower_logits(logits, tokens, torch.where(valid, lowered, math.inf))
