"""What makes the processors batched: a step's tensor ops do not depend on the batch, no
device-to-host copy on the hot path, and bounded device memory."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from governor.processors.dry import DRYLogitsProcessor
from governor.processors.extra_args import encode_ids
from governor.processors.ngram import NoRepeatNGramLogitsProcessor
from governor.processors.window_penalty import WindowedRepetitionPenaltyLogitsProcessor

from .harness import BatchSim, make_processor

PROCESSORS = [DRYLogitsProcessor, NoRepeatNGramLogitsProcessor, WindowedRepetitionPenaltyLogitsProcessor]
VOCAB = 50
# Every processor on, as under the `strict` preset.
STRICT_LIKE: dict[str, Any] = {
    "gov_dry_multiplier": 1.5,
    "gov_dry_allowed_length": 2,
    "gov_dry_range": 64,
    "gov_dry_breakers": encode_ids([0, 7]),
    "gov_ngram_size": 3,
    "gov_ngram_window": 32,
    "gov_rep_penalty": 1.15,
    "gov_rep_window": 16,
    "gov_rep_exempt": encode_ids([1, 2, 3]),
}
# Anything that copies device memory to the host (and so waits for the device).
SYNCING = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__", "any", "all"}


class RecordTorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", str(func))
        if name != "__get__":  # attribute reads (.shape, .dtype) are not ops
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def _steady_step_calls(cls: type, batch: int) -> list[str]:
    rng = random.Random(batch)
    sim = BatchSim(make_processor(cls, VOCAB), batch_size=batch)
    requests = []
    for index in range(batch):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(5, 30))]
        requests.append(sim.add(index, STRICT_LIKE, prompt, [rng.randrange(VOCAB) for _ in range(3)]))
    sim.flush()
    for step in range(4):
        for request in requests:
            request.output.append(rng.randrange(5) if step % 2 else rng.randrange(VOCAB))
        sim.flush()  # no batch change: update_state(None), as vLLM does
        logits = torch.randn(batch, VOCAB)
        if step < 3:
            sim.processor.apply(logits)
            continue
        with RecordTorchCalls() as record:
            sim.processor.apply(logits)
    return record.names


@pytest.mark.parametrize("cls", PROCESSORS)
def test_steady_step_is_the_same_tensor_ops_whatever_the_batch_and_never_syncs(cls: type) -> None:
    small, large = _steady_step_calls(cls, 3), _steady_step_calls(cls, 48)
    assert small == large
    assert len(small) < 90
    assert not SYNCING & set(small), sorted(SYNCING & set(small))


def _config(vocab: int, max_len: int, max_rows: int) -> Any:
    model = SimpleNamespace(get_vocab_size=lambda: vocab, max_model_len=max_len)
    return SimpleNamespace(model_config=model, scheduler_config=SimpleNamespace(max_num_seqs=max_rows))


@pytest.mark.parametrize("cls", PROCESSORS)
def test_history_is_bounded_by_the_engine_limits(cls: type) -> None:
    processor = cls(_config(VOCAB, 300, 4), torch.device("cpu"), False)
    sim = BatchSim(processor, batch_size=4)
    requests = [sim.add(i, {**STRICT_LIKE, "gov_rep_scope": "all"}, [i] * 100, [1] * 60) for i in range(4)]
    sim.flush()
    for _ in range(140):  # rows are right-aligned and moved back left when the columns run out
        processor.apply(torch.randn(4, VOCAB))
        for request in requests:
            request.output.append(len(request.output) % VOCAB)
    # Twice the longest history (plus two EMPTY columns), so a move happens at most every ~300 steps.
    assert processor.history.shape[0] == 4 and processor.history.shape[1] <= 2 * (300 + 3)


def test_unused_processor_allocates_nothing() -> None:
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=2)
    sim.add(0, None, [1, 2, 3], [])
    sim.add(1, {"gov_ngram_size": 3}, [1, 2, 3], [])
    sim.flush()
    sim.processor.apply(torch.randn(2, VOCAB))
    assert sim.processor.history.numel() == 0


def test_logits_wider_than_the_vocab_and_ids_beyond_it() -> None:
    # Padded logits (wider than the configured vocab) and prompt ids past it: never penalised, no crash.
    processor = make_processor(WindowedRepetitionPenaltyLogitsProcessor, 8)
    sim = BatchSim(processor, batch_size=1)
    sim.add(0, {"gov_rep_penalty": 2.0, "gov_rep_scope": "all"}, [3, 9, 12], [3])
    sim.flush()
    got = processor.apply(torch.full((1, 10), 2.0))
    assert got[0].tolist() == [2.0, 2.0, 2.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
