"""WindowedRepetitionPenaltyLogitsProcessor against a from-scratch windowed penalty."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from governor.processors.extra_args import encode_ids
from governor.processors.window_penalty import WindowedRepetitionPenaltyLogitsProcessor

from .harness import BatchSim, make_processor, random_session

VOCAB = 12


def penalty_reference(prompt: list[int], output: list[int], args: dict[str, Any], row: torch.Tensor) -> torch.Tensor:
    """HF RepetitionPenaltyLogitsProcessor over the window, minus exempt ids."""
    penalty = float(args.get("gov_rep_penalty", 1.0))
    window = int(args.get("gov_rep_window", 0))
    sequence = prompt + output if args.get("gov_rep_scope") == "all" else output
    if window:
        sequence = sequence[-window:]
    exempt = {int(t) for t in args.get("gov_rep_exempt", "").split(",") if t}
    tokens = {t for t in sequence if t < row.shape[0]} - exempt
    if penalty <= 1 or not tokens:
        return row
    index = torch.tensor(sorted(tokens))
    values = row[index]
    row[index] = torch.where(values > 0, values / penalty, values * penalty)
    return row


def random_penalty_args(rng: random.Random) -> dict[str, Any] | None:
    if rng.random() < 0.25:
        return rng.choice([None, {}, {"gov_rep_penalty": 1.0}, {"gov_ngram_size": 2}])
    args: dict[str, Any] = {"gov_rep_penalty": rng.choice([1.1, 1.5, 3.0])}
    if rng.random() < 0.6:
        args["gov_rep_window"] = rng.choice([0, 1, 3, 8])
    if rng.random() < 0.6:
        args["gov_rep_scope"] = rng.choice(["output", "all"])
    if rng.random() < 0.4:
        # Ids past the vocabulary are accepted and ignored.
        args["gov_rep_exempt"] = encode_ids([*rng.sample(range(VOCAB), 3), VOCAB + 7])
    return args


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_under_batch_churn(seed: int) -> None:
    processor = make_processor(WindowedRepetitionPenaltyLogitsProcessor, VOCAB)
    sim = random_session(processor, penalty_reference, random_penalty_args, seed, vocab=VOCAB)
    # Rows leaving by removal, replacement or being overwritten by a move all return their slot.
    assert processor._next_slot <= sim.batch_size
    assert len(processor._free_slots) + len(processor.rows) == processor._next_slot


def _apply_once(args: dict[str, Any], prompt: list[int], output: list[int], logits: torch.Tensor) -> torch.Tensor:
    sim = BatchSim(make_processor(WindowedRepetitionPenaltyLogitsProcessor, VOCAB), batch_size=1)
    sim.add(0, args, prompt, output)
    sim.flush()
    return sim.processor.apply(logits.clone())  # type: ignore[no-any-return]


def test_positive_divided_negative_multiplied() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0] + [0.0] * (VOCAB - 4)])
    got = _apply_once({"gov_rep_penalty": 2.0}, [], [0, 1], logits)
    assert got[0, :4].tolist() == [1.0, -4.0, 2.0, -2.0]


def test_exempt_ids_are_never_penalised() -> None:
    logits = torch.full((1, VOCAB), 2.0)
    got = _apply_once({"gov_rep_penalty": 2.0, "gov_rep_exempt": "1"}, [], [0, 1, 1, 1], logits)
    assert got[0, 0].item() == 1.0
    assert got[0, 1].item() == 2.0


def test_window_and_scope() -> None:
    args = {"gov_rep_penalty": 2.0, "gov_rep_window": 2}
    got = _apply_once(args, [5], [0, 1, 2], torch.full((1, VOCAB), 2.0))
    assert got[0, :3].tolist() == [2.0, 1.0, 1.0]  # only "1 2" are in the last two tokens
    got = _apply_once({"gov_rep_penalty": 2.0}, [5], [0], torch.full((1, VOCAB), 2.0))
    assert got[0, 5].item() == 2.0  # default scope is output only
    got = _apply_once(
        {"gov_rep_penalty": 2.0, "gov_rep_scope": "all"}, [5, VOCAB + 3], [0], torch.full((1, VOCAB), 2.0)
    )
    assert got[0, 5].item() == 1.0


def test_slots_are_reused_cleanly() -> None:
    # A finished request's tokens must not leak into the next request that takes its slot.
    sim = BatchSim(make_processor(WindowedRepetitionPenaltyLogitsProcessor, VOCAB), batch_size=2)
    sim.add(0, {"gov_rep_penalty": 2.0}, [], [3, 4])
    sim.flush()
    sim.processor.apply(torch.zeros(2, VOCAB))
    sim.remove(0)
    sim.flush()
    sim.add(1, {"gov_rep_penalty": 2.0}, [], [5])
    sim.flush()
    got = sim.processor.apply(torch.full((2, VOCAB), 2.0))
    assert got[1, 3].item() == 2.0 and got[1, 4].item() == 2.0 and got[1, 5].item() == 1.0
    assert torch.equal(got[0], torch.full((VOCAB,), 2.0))
