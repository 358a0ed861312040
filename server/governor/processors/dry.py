"""DRY ("Don't Repeat Yourself") sampler as a batched vLLM v1 logits processor.

p-e-w's algorithm as implemented in text-generation-webui and koboldcpp: for every earlier
occurrence of the context's last token, measure how far the text before it matches the text
before the end of the context; the token that followed that occurrence would extend a repeat of
that length L, so when L >= allowed_length it loses ``multiplier * base ** (L - allowed_length)``
from its logit. Sequence-breaker tokens end a match. The context is prompt + output, or the output
alone with ``gov_dry_scope`` "output" (copying from the prompt is then free: quotes, choruses, edits).

The match lengths live on the device (``SuffixMatch``) and grow or reset with each token; a step
is a fixed number of tensor ops over [rows, context] slices of the aligned history. Breakers are
stored as ``BREAK`` and compared as ``NEVER``, so they can never be part of a match.
``reference.dry`` is the per-row original this is tested against.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams

from governor.processors.cells import BREAK, UNBOUNDED, grown, outside_keys
from governor.processors.extra_args import DRYConfig, parse_dry
from governor.processors.slots import BatchedLogitsProcessor, SlotRow, Step
from governor.processors.suffix_match import SuffixMatch
from governor.processors.token_sets import TokenSets

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# Longest match measured. Bounds the state and keeps base ** L finite; the reference
# implementations use the same cap.
MAX_MATCH_LENGTH = 50


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
        self.range = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.breakers = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._seen_layout = -1
        self._widest = self._narrowest = UNBOUNDED  # the largest and smallest range among the rows
        self._bans = False  # some row's penalty overflows to inf

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_dry_*`` values before the request reaches the engine."""
        parse_dry(sampling_params.extra_args)

    def parse(self, extra_args: dict[str, Any] | None) -> DRYConfig | None:
        return parse_dry(extra_args)

    def kept_prompt(self, config: DRYConfig, prompt: list[int]) -> list[int]:
        return prompt if config.include_prompt else []

    def resize_state(self, slots: int, columns: int, src: int, dst: int, count: int) -> None:
        self.matches.resize(slots, columns, src, dst, count)
        if slots > self.scale.shape[0]:
            self.scale = grown(self.scale, (slots, MAX_MATCH_LENGTH + 1))
            self.range = grown(self.range, (slots,))
            self.breakers = grown(self.breakers, (slots,))

    def configure(self, rows: list[SlotRow]) -> None:
        for row in rows:
            row.token_set = self.sets.acquire(row.config.breakers, self.host_to_device)
        ints = [row.slot for row in rows] + [row.token_set for row in rows]
        ints += [min(row.config.range or UNBOUNDED, UNBOUNDED) for row in rows]
        slots, sets, ranges = self.host_to_device(ints, torch.int64).split(len(rows))
        scales = [value for row in rows for value in penalty_scale(row.config)]
        self.scale[slots] = self.host_to_device(scales, torch.float32).view(len(rows), -1)
        self.breakers[slots] = sets
        self.range[slots] = ranges.to(torch.int32)

    def release_config(self, row: SlotRow) -> None:
        self.sets.release(row.token_set)

    def encode(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Breakers become ``BREAK`` (they match nothing and are never penalised)."""
        breaker = self.sets.contains(self.breakers[slots], tokens)
        return torch.where(breaker, BREAK, outside_keys(tokens, self.vocab_size))

    def encode_newest(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.where(self.sets.member(self.per_slot(self.breakers), tokens), BREAK, tokens.to(torch.int32))

    def penalize(self, logits: torch.Tensor, step: Step) -> None:
        if self._seen_layout != self.layout_version:
            ranges = [row.config.range or UNBOUNDED for row in self.active]
            self._widest, self._narrowest = max(ranges), min(ranges)
            # The scale only grows with the length (base >= 1), so its last entry says if it bans.
            self._bans = any(math.isinf(penalty_scale(row.config)[-1]) for row in self.active)
            self._seen_layout = self.layout_version
        # Earlier occurrences lie at distances 1..t, and within a range r only those below r.
        width = min(step.longest - 1, self._widest - 1)
        match = self.matches.update(self, step, width, MAX_MATCH_LENGTH)
        if match is None:
            return
        now = step.now
        length = match.long()  # gather's index type
        # The match may not reach back before the range's start (reference: the context is cut
        # there): at column now - width + j it may count at most j - width + range tokens, which
        # only bites (is below the cap) in the first MAX_MATCH_LENGTH + width - range columns.
        near = min(width, MAX_MATCH_LENGTH + width - self._narrowest)
        if near > 0:
            reach = self.per_slot(self.range).unsqueeze(1) - width
            cut = length[:, :near]
            torch.minimum(cut, self.columns[:near] + reach, out=cut).clamp_(min=0)
        # The token after each earlier occurrence: the candidate that would extend the repeat.
        tokens, alive = self.targets(logits, now - width + 1, now + 1)
        penalty = self.per_slot(self.scale).gather(1, length).mul_(alive)
        if self._bans:
            # A ban (inf) times a dead cell (0) is nan: that cell has nothing to lower.
            penalty.nan_to_num_(nan=0.0, posinf=math.inf)
        tokens = self.cache_friendly(logits, tokens, penalty)  # almost every cell has no penalty
        lowered = self.read_logits(logits, tokens).sub_(penalty.to(logits.dtype))
        self.lower_logits(logits, tokens, lowered)
