"""The Governor processor behind vLLM's new model runner ("Model Runner V2") processor interface.

The new runner (``vllm/v1/worker/gpu/sample/logits_processor/interface.py``, vLLM 0.32) refuses
v1-interface processors; its own interface differs in three ways that matter here:

- requests live in persistent slots, reused through a free list with no removal call: a slot is
  re-initialised by ``add_request``, and a request that finished simply stops appearing;
- the batch is re-laid out every step: logits row ``r`` belongs to slot ``ctx.idx_mapping_np[r]``;
- tokens are not handed over as lists: the runner keeps them on the device (``all_token_ids``
  up to ``total_len``, the prompt's length in ``prompt_len``).

``GovernorRunnerV2Processor`` turns that into the v1 batch updates ``GovernorLogitsProcessor``
already handles (rows moved by swaps, slots entering and leaving as adds and removes), so both
runners share one implementation and its bit-for-bit tests against the three reference processors.
Tokens come from the runner's history: per step one gather of every participating slot's length
and newest token, read to the host in one copy (free on CPU; on CUDA this copy waits for the
previous step's sampling, as the old runner's placeholder fix-up does), and a slot's whole row only
when it enters or did not simply gain one token. Per-slot outputs are kept as the live lists the v1
processor reads.

Speculative decoding is refused at engine start: under it a request owns one logits row per draft
token, the drafts exist only in ``ctx.input_ids``, and a draft row's history differs from its
request's; the shared processor has one history per row, so it could not be exact for them.

This module imports without the new runner (vLLM 0.25 has no such interface): the class then
derives from ``object`` and ``HAS_RUNNER_V2_INTERFACE`` is False; ``engine/compat.py`` decides
whether it is ever named to vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from governor.processors.governor import GovernorLogitsProcessor

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor.interface import (
        LogitsContext,
        LogitsProcessor,
        LogitsProcRequestState,
    )

    HAS_RUNNER_V2_INTERFACE = True
else:
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor
    except ImportError:  # vLLM without the new runner's interface (0.25)
        LogitsProcessor = object
        HAS_RUNNER_V2_INTERFACE = False
    else:
        HAS_RUNNER_V2_INTERFACE = True

SPEC_DECODING_REFUSED = (
    "Governor's logits processors do not support speculative decoding on the new model runner: a draft "
    "token's row would need its own history"
)
_NONE = -1  # no slot (in a row), no row (for a slot)


class GovernorRunnerV2Processor(LogitsProcessor):
    """DRY, the n-gram ban and the windowed penalty for the new model runner: ``GovernorLogitsProcessor``
    driven through slots, a per-step layout and the runner's on-device token history."""

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError(SPEC_DECODING_REFUSED)
        self.req_states = req_states
        self.device = torch.device(req_states.device)
        self.inner = GovernorLogitsProcessor(vllm_config, self.device, self.device.type == "cuda")
        slots = int(req_states.max_num_reqs)
        self.params: list[SamplingParams | None] = [None] * slots
        self.uses = np.zeros(slots, dtype=bool)  # the slot's request asked for some control
        self.fresh = np.zeros(slots, dtype=bool)  # add_request since the slot was last laid out
        self.row_of = np.full(slots, _NONE, dtype=np.int64)  # the inner processor's row for the slot
        self.seen = np.zeros(slots, dtype=np.int64)  # tokens (prompt + output) read for the slot
        self.outputs: dict[int, list[int]] = {}  # the live output lists the inner processor reads
        self.at_row = np.full(0, _NONE, dtype=np.int64)  # slot per inner row

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``gov_*`` values at admission, as the v1 processor does."""
        GovernorLogitsProcessor.validate_params(sampling_params)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """Note the slot's new request; its tokens are read at the next apply, once the runner wrote them."""
        configs = self.inner.configs
        config = configs.acquire(sampling_params.extra_args)  # parsed once per distinct config
        if config is not None:
            configs.release(config)  # the inner processor acquires it when the request enters its batch
        self.params[req_idx] = sampling_params
        self.uses[req_idx] = config is not None
        self.fresh[req_idx] = True
        return config is not None

    def apply_staged_writes(self) -> None:
        """Nothing staged: the runner's own history is read at apply."""

    def is_argmax_invariant(self) -> bool:
        """Every control can change the most likely token."""
        return False

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """Bring the inner processor's batch to this step's layout and tokens, then let it lower the logits."""
        layout = np.asarray(ctx.idx_mapping_np, dtype=np.int64)
        want = np.where(self.uses[layout], layout, _NONE)
        if not (want >= 0).any() and not self.outputs:
            return logits
        if logits.shape[0] != layout.shape[0]:  # one row per request, or the rows are not requests
            raise RuntimeError(SPEC_DECODING_REFUSED)
        self._relayout(want)
        if not self.outputs:
            return logits
        return self.inner.apply(logits)

    # ---- layout -----------------------------------------------------------------------------------

    def _relayout(self, want: np.ndarray) -> None:
        """Read the new tokens, then swap, remove and add rows until inner row r holds slot ``want[r]``."""
        n = want.shape[0]
        if self.at_row.shape[0] < n:
            self.at_row = np.pad(self.at_row, (0, n - self.at_row.shape[0]), constant_values=_NONE)
        current, wanted = self.at_row, want[want >= 0]
        if not self.fresh[wanted].any() and np.array_equal(current[:n], want) and not (current[n:] >= 0).any():
            self._read_tokens(wanted)  # the steady step: same slots in the same rows
            return
        # A fresh slot's previous occupant ended: its row is emptied before the swaps (vLLM's order
        # within one update is removals, additions, moves); the fresh slot enters anew below.
        ended = [int(row) for row in self.row_of[np.flatnonzero(self.fresh)].tolist() if row >= 0]
        for row in ended:
            self._forget(row)
        self.fresh[wanted] = False
        moves = self._moves(want)
        if ended or moves:
            self.inner.update_state(BatchUpdate(batch_size=n, removed=ended, added=[], moved=moves))
        # Rows still wrong after the swaps hold slots not in this step (they are re-read whole if they
        # come back) or are wanted by slots not in the inner batch yet.
        target = np.pad(want, (0, current.shape[0] - n), constant_values=_NONE)
        wrong = np.flatnonzero(current != target).tolist()
        left = [row for row in wrong if current[row] >= 0]
        for row in left:
            self._forget(row)
        self._read_tokens(wanted[self.row_of[wanted] >= 0])
        added = [self._enter(int(want[row]), row) for row in wrong if row < n and want[row] >= 0]
        if left or added:
            self.inner.update_state(BatchUpdate(batch_size=n, removed=left, added=added, moved=[]))

    def _moves(self, want: np.ndarray) -> list[tuple[int, int, MoveDirectionality]]:
        """Swaps that bring every slot already in the inner batch to its row (Python work per row changed)."""
        current, row_of = self.at_row, self.row_of
        moves: list[tuple[int, int, MoveDirectionality]] = []
        for row in np.flatnonzero(current[: want.shape[0]] != want).tolist():
            slot = int(want[row])
            source = int(row_of[slot]) if slot >= 0 else _NONE
            if source < 0 or source == row:
                continue
            moves.append((source, row, MoveDirectionality.SWAP))
            displaced = int(current[row])
            current[row], current[source] = slot, displaced
            row_of[slot] = row
            if displaced >= 0:
                row_of[displaced] = source
        return moves

    def _forget(self, row: int) -> None:
        slot = int(self.at_row[row])
        self.at_row[row] = _NONE
        self.row_of[slot] = _NONE
        self.outputs.pop(slot, None)

    def _enter(self, slot: int, row: int) -> tuple[int, SamplingParams, list[int], list[int]]:
        """A slot entering the inner batch: its prompt and output read whole from the runner's history."""
        tokens = self._row_tokens(slot)
        prompt_len = int(self.req_states.prompt_len.np[slot])
        output = tokens[prompt_len:]
        self.outputs[slot] = output
        self.seen[slot] = len(tokens)
        self.at_row[row] = slot
        self.row_of[slot] = row
        params = self.params[slot]
        assert params is not None
        return row, params, tokens[:prompt_len], output

    # ---- the runner's token history ---------------------------------------------------------------

    def _read_tokens(self, slots: np.ndarray) -> None:
        """Extend the outputs of ``slots`` (all in the inner batch) to the runner's current lengths."""
        if not slots.shape[0]:
            return
        lengths, newest = self._lengths_and_newest(slots)
        gained = lengths - self.seen[slots]
        one = gained == 1
        if one.all():
            for slot, token in zip(slots.tolist(), newest.tolist(), strict=True):
                self.outputs[slot].append(token)
        else:
            for slot, token, count in zip(slots.tolist(), newest.tolist(), gained.tolist(), strict=True):
                if count == 1:
                    self.outputs[slot].append(token)
                elif count:  # several tokens, or fewer than before: the output is read whole
                    prompt_len = int(self.req_states.prompt_len.np[slot])
                    self.outputs[slot][:] = self._row_tokens(slot)[prompt_len:]
        self.seen[slots] = lengths

    def _lengths_and_newest(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each slot's ``total_len`` and the token at ``total_len - 1``: one gather, one copy to the host."""
        total_len, history = self.req_states.total_len.gpu, self.req_states.all_token_ids.gpu
        if total_len.device.type == "cpu" and history.device.type == "cpu":
            lengths = total_len.numpy()[slots].astype(np.int64)
            newest = history.numpy()[slots, np.maximum(lengths - 1, 0)].astype(np.int64)
            return lengths, newest
        index = torch.from_numpy(slots).to(history.device, non_blocking=True)
        lengths_dev = total_len.index_select(0, index).long()
        newest_dev = history[index, (lengths_dev - 1).clamp_(min=0)].long()
        both = torch.stack([lengths_dev, newest_dev]).cpu().numpy()
        return both[0], both[1]

    def _row_tokens(self, slot: int) -> list[int]:
        """The slot's whole history (prompt, then output) as the runner holds it."""
        total_len, history = self.req_states.total_len.gpu, self.req_states.all_token_ids.gpu
        length = int(total_len[slot])
        tokens: list[Any] = history[slot, :length].tolist()
        return tokens
