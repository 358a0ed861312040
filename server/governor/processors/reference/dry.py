"""DRY ("Don't Repeat Yourself") sampler as a vLLM v1 logits processor.

p-e-w's algorithm as implemented in text-generation-webui and koboldcpp: for every earlier
occurrence of the context's last token, measure how far the text before it matches the text
before the end of the context; the token that followed that occurrence would extend a repeat of
that length L, so when L >= allowed_length it loses ``multiplier * base ** (L - allowed_length)``
from its logit. Sequence-breaker tokens end a match. The context is prompt + output, or the output
alone with ``gov_dry_scope`` "output".
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

import torch
from vllm import SamplingParams

from governor.processors.base import OutputCursor, RowStateLogitsProcessor
from governor.processors.extra_args import DRYConfig, parse_dry

# Longest match measured. Bounds the per-step cost on long repeats and keeps base ** L finite;
# the reference implementations use the same cap.
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


@dataclass(slots=True)
class DRYRow:
    """One request's context with a token -> positions index, extended as the output grows.

    The index turns "find every earlier occurrence of the last token" from a scan of the whole
    context into a lookup, which is what keeps long prompts cheap per generated token.
    """

    config: DRYConfig
    prompt: list[int]
    cursor: OutputCursor
    # scale[L] is the penalty for extending a repeat of length L (0 below allowed_length).
    scale: list[float]
    context: list[int] = field(default_factory=list)
    positions: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._extend(self.prompt)

    def _extend(self, tokens: list[int]) -> None:
        base = len(self.context)
        self.context.extend(tokens)
        positions = self.positions
        for offset, token in enumerate(tokens):
            if token in positions:
                positions[token].append(base + offset)
            else:
                positions[token] = [base + offset]

    def sync(self) -> None:
        """Append newly generated output tokens to the context."""
        reset, start, stop = self.cursor.advance()
        if reset:
            self.context = []
            self.positions = {}
            self._extend(self.prompt)
        if stop > start:
            self._extend(self.cursor.output[start:stop])

    def penalties(self) -> dict[int, float]:
        """Logit penalty per candidate next token (only tokens that have one)."""
        self.sync()
        ctx = self.context
        end = len(ctx) - 1  # position of the last token
        config = self.config
        if end < 1:
            return {}
        last = ctx[end]
        breakers = config.breakers
        if last in breakers:
            return {}
        start = max(0, len(ctx) - config.range) if config.range else 0
        occurrences = self.positions[last]
        match_lengths: dict[int, int] = {}
        # The final entry is ``end`` itself, which always matches and is skipped.
        for i in occurrences[bisect_left(occurrences, start) : -1]:
            following = ctx[i + 1]
            if following in breakers:
                continue
            length = 1
            while length < MAX_MATCH_LENGTH:
                j = i - length
                if j < start:
                    break
                previous = ctx[end - length]
                if ctx[j] != previous or previous in breakers:
                    break
                length += 1
            if length > match_lengths.get(following, 0):
                match_lengths[following] = length
        scale = self.scale
        return {token: scale[length] for token, length in match_lengths.items() if scale[length]}


class DRYLogitsProcessor(RowStateLogitsProcessor[DRYRow]):
    """Penalises tokens that would extend a verbatim repeat of earlier context.

    Enabled per request by ``gov_dry_multiplier`` > 0 in ``SamplingParams.extra_args``.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_dry_*`` values before the request reaches the engine."""
        parse_dry(sampling_params.extra_args)

    def new_row(self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> DRYRow | None:
        """Track the request when it asked for DRY, indexing its prompt once up front."""
        config = parse_dry(params.extra_args)
        if config is None:
            return None
        prompt = (prompt_ids or []) if config.include_prompt else []
        return DRYRow(config, prompt, OutputCursor(output_ids), penalty_scale(config))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Subtract each row's DRY penalties from its logits."""
        if not self.rows:
            return logits
        rows: list[int] = []
        tokens: list[int] = []
        amounts: list[float] = []
        width = logits.shape[-1]
        for index, row in self.rows.items():
            for token, amount in row.penalties().items():
                # Prompt ids come from the client's tokenizer; never index past the logits.
                if token < width:
                    rows.append(index)
                    tokens.append(token)
                    amounts.append(-amount)
        if tokens:
            values = self.host_to_device(amounts, logits.dtype)
            # Each (row, token) pair occurs once, so accumulate is a plain in-place subtraction.
            logits.index_put_(self.index_pair(rows, tokens), values, accumulate=True)
        return logits
