"""Windowed repetition penalty as a vLLM v1 logits processor.

HF/CTRL-style: every token seen in the last ``gov_rep_window`` tokens (output, or prompt+output)
has a positive logit divided by the penalty and a negative one multiplied by it. vLLM's own
``repetition_penalty`` looks at the whole prompt and output; a window lets long answers reuse
vocabulary from far back while still breaking short loops, and exempt ids keep digits,
punctuation and special tokens free.

The host keeps per-token counts of each window, updated by the tokens entering and leaving it.
Small windows are applied sparsely: the (row, token) pairs are listed and only those logits are
touched. Large ones (a long prompt with scope "all", say) go through a device-side boolean mask,
one row ("slot") per request, that receives only the tokens whose membership changed; a step then
costs O(tokens added + dropped) on the host plus one elementwise pass over the active rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams

from governor.processors.base import OutputCursor, RowStateLogitsProcessor
from governor.processors.extra_args import parse_rep_penalty

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_MIN_SLOTS = 8
# Up to this many (row, token) pairs in the batch, listing them on the host and touching only
# those logits beats an elementwise pass over batch x vocab (by ~10x on CPU for 64-token
# windows); past it the host lists cost more than the device pass, which GPUs make nearly free.
SPARSE_LIMIT = 4096


@dataclass(slots=True)
class PenaltyRow:
    """Counts of the penalised tokens in one request's window.

    The window runs over the virtual sequence ``prompt + output`` (``prompt`` is empty when the
    scope is output only); positions ``[low, seen)`` of that sequence are counted.
    """

    penalty: float
    window: int
    exempt: frozenset[int]
    prompt: list[int]
    cursor: OutputCursor
    slot: int
    counts: dict[int, int] = field(default_factory=dict)
    low: int = 0
    seen: int = 0
    fresh: bool = True  # the mask row still holds a previous owner's tokens

    def _tokens(self, start: int, stop: int) -> list[int]:
        """Tokens at positions ``[start, stop)`` of ``prompt + output`` without concatenating them."""
        prompt_len = len(self.prompt)
        if stop <= prompt_len:
            return self.prompt[start:stop]
        if start >= prompt_len:
            return self.cursor.output[start - prompt_len : stop - prompt_len]
        return self.prompt[start:] + self.cursor.output[: stop - prompt_len]

    def sync(self, width: int, changed: set[int]) -> None:
        """Slide the window to the current output; adds tokens whose membership flipped to ``changed``."""
        reset, _, length = self.cursor.advance()
        if reset:
            # Recount from scratch and resend every token whose state may have flipped.
            changed.update(self.counts)
            self.counts.clear()
            self.low = self.seen = 0
        total = len(self.prompt) + length
        low = max(0, total - self.window) if self.window else 0
        counts, exempt = self.counts, self.exempt
        for token in self._tokens(self.low, min(self.seen, low)):
            if token in counts:
                count = counts[token] - 1
                if count:
                    counts[token] = count
                else:
                    del counts[token]
                    changed.add(token)
        for token in self._tokens(max(self.seen, low), total):
            if token in counts:
                counts[token] += 1
            elif token < width and token not in exempt:
                counts[token] = 1
                changed.add(token)
        self.low, self.seen = low, total


class WindowedRepetitionPenaltyLogitsProcessor(RowStateLogitsProcessor[PenaltyRow]):
    """Applies a repetition penalty to the tokens of a recent window only.

    Enabled per request by ``gov_rep_penalty`` > 1 in ``SamplingParams.extra_args``.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        # Allocated on first use so servers where nobody asks for the penalty hold no memory.
        self._mask = torch.zeros((0, self.vocab_size), dtype=torch.bool, device=self.device)
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.sparse_limit = SPARSE_LIMIT

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_rep_*`` values before the request reaches the engine."""
        parse_rep_penalty(sampling_params.extra_args)

    def new_row(self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> PenaltyRow | None:
        """Track the request when it asked for a penalty above 1 and give it a mask slot."""
        config = parse_rep_penalty(params.extra_args)
        if config is None:
            return None
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._next_slot
            self._next_slot += 1
        return PenaltyRow(
            penalty=config.penalty,
            window=config.window,
            exempt=config.exempt,
            prompt=(prompt_ids or []) if config.include_prompt else [],
            cursor=OutputCursor(output_ids),
            slot=slot,
        )

    def release_row(self, row: PenaltyRow) -> None:
        """Return the row's mask slot; it is cleared when next handed out."""
        self._free_slots.append(row.slot)

    def _ensure_capacity(self) -> None:
        capacity = self._mask.shape[0]
        if self._next_slot <= capacity:
            return
        grown = torch.zeros(
            (max(_MIN_SLOTS, 2 * capacity, self._next_slot), self.vocab_size), dtype=torch.bool, device=self.device
        )
        grown[:capacity] = self._mask
        self._mask = grown

    def _update_mask(self) -> None:
        """Bring every active row's mask slot up to date with its window."""
        self._ensure_capacity()
        cleared: list[int] = []
        slots: list[int] = []
        tokens: list[int] = []
        flags: list[int] = []
        changed: set[int] = set()
        for row in self.rows.values():
            if row.fresh:
                cleared.append(row.slot)
                row.fresh = False
            row.sync(self.vocab_size, changed)
            if changed:
                counts = row.counts
                for token in changed:
                    slots.append(row.slot)
                    tokens.append(token)
                    flags.append(token in counts)
                changed.clear()
        if cleared:
            self._mask[self.host_to_device(cleared, torch.int64)] = False
        if tokens:
            slot_index, token_index = self.index_pair(slots, tokens)
            self._mask.index_put_((slot_index, token_index), self.host_to_device(flags, torch.bool))

    def _layout_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch rows, their mask slots, penalty - 1 as a column), rebuilt only on batch changes."""
        if self._layout is None or self.layout_changed:
            slots = [row.slot for row in self.rows.values()]
            excess = [row.penalty - 1.0 for row in self.rows.values()]
            row_index, slot_index = self.index_pair(list(self.rows), slots)
            self._layout = (row_index, slot_index, self.host_to_device(excess, torch.float32).unsqueeze(1))
            self.layout_changed = False
        return self._layout

    def _apply_sparse(self, logits: torch.Tensor) -> None:
        """Gather, penalise and scatter back just the windowed tokens, listed on the host."""
        rows: list[int] = []
        tokens: list[int] = []
        penalties: list[float] = []
        for index, row in self.rows.items():
            count = len(row.counts)
            rows.extend([index] * count)
            tokens.extend(row.counts)
            penalties.extend([row.penalty] * count)
        if not tokens:
            return
        where = self.index_pair(rows, tokens)
        values = logits[where]
        penalty = self.host_to_device(penalties, logits.dtype)
        # With penalty >= 1, min(x / p, x * p) is x / p for positive x and x * p for negative x.
        logits[where] = torch.minimum(values / penalty, values * penalty)

    def _apply_dense(self, logits: torch.Tensor) -> None:
        """Penalise whole rows through the device mask: one elementwise pass, no host token lists."""
        row_index, slot_index, excess = self._layout_tensors()
        mask = self._mask.index_select(0, slot_index)
        width = logits.shape[-1]
        if mask.shape[-1] > width:
            mask = mask[:, :width]
        elif mask.shape[-1] < width:
            # Logits wider than the configured vocab (padding): extra columns are never penalised.
            mask = torch.nn.functional.pad(mask, (0, width - mask.shape[-1]))
        # Per-element penalty: p on windowed tokens, exactly 1 elsewhere, so min() leaves those as is.
        penalty = mask.to(logits.dtype).mul_(excess).add_(1.0)
        selected = logits.index_select(0, row_index)
        torch.minimum(selected / penalty, selected.mul_(penalty), out=selected)
        logits.index_copy_(0, row_index, selected)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Divide positive / multiply negative logits of windowed tokens by each row's penalty."""
        if not self.rows:
            return logits
        self._update_mask()
        entries = sum(len(row.counts) for row in self.rows.values())
        if entries <= self.sparse_limit and logits.shape[-1] >= self.vocab_size:
            self._apply_sparse(logits)
        else:
            self._apply_dense(logits)
        return logits
