"""The batched processors against the per-row reference implementations, under random batch churn.

Both are driven by the very same BatchUpdates and the same live output lists (adds, removals,
moves, swaps, async placeholders, dropped and regenerated tokens); after every step their logits
must agree within 1e-5 with the same argmax, and both must agree with the from-scratch rule.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from governor.processors.dry import DRYLogitsProcessor
from governor.processors.extra_args import encode_ids
from governor.processors.ngram import NoRepeatNGramLogitsProcessor
from governor.processors.reference.dry import DRYLogitsProcessor as ReferenceDRY
from governor.processors.reference.ngram import NoRepeatNGramLogitsProcessor as ReferenceNGram
from governor.processors.reference.window_penalty import WindowedRepetitionPenaltyLogitsProcessor as ReferencePenalty
from governor.processors.window_penalty import WindowedRepetitionPenaltyLogitsProcessor

from .harness import BatchSim, long_outputs, make_processor, next_token, random_session
from .test_dry import dry_reference
from .test_ngram import ngram_reference
from .test_window_penalty import penalty_reference


class Lockstep:
    """Feeds every update to the batched processor and its reference; apply() compares them."""

    def __init__(self, batched: Any, reference: Any) -> None:
        self.batched, self.reference = batched, reference
        self.rows = batched.rows
        self.steps = 0

    def update_state(self, update: Any) -> None:
        self.batched.update_state(update)
        self.reference.update_state(update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        expected = self.reference.apply(logits.clone())
        got = self.batched.apply(logits)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        self.steps += 1
        return got


def dry_args(vocab: int) -> Any:
    def make(rng: random.Random) -> dict[str, Any] | None:
        if rng.random() < 0.2:
            return rng.choice([None, {}, {"gov_dry_multiplier": 0.0}, {"gov_ngram_size": 2}])
        return {
            "gov_dry_multiplier": rng.choice([0.5, 1.0, 2.5]),
            "gov_dry_base": rng.choice([1.0, 1.75, 3.0]),
            "gov_dry_allowed_length": rng.choice([1, 2, 3, 4]),
            "gov_dry_range": rng.choice([0, 0, 3, 9, 30]),
            "gov_dry_breakers": encode_ids(rng.sample(range(vocab + 2), rng.choice([0, 1, 3]))),
            "gov_dry_scope": rng.choice(["all", "all", "output"]),
        }

    return make


def ngram_args(vocab: int) -> Any:
    def make(rng: random.Random) -> dict[str, Any] | None:
        if rng.random() < 0.2:
            return rng.choice([None, {}, {"gov_ngram_size": 0}, {"gov_dry_multiplier": 1.0}])
        return {"gov_ngram_size": rng.choice([1, 2, 3, 4, 6]), "gov_ngram_window": rng.choice([0, 0, 2, 5, 17])}

    return make


def penalty_args(vocab: int) -> Any:
    def make(rng: random.Random) -> dict[str, Any] | None:
        if rng.random() < 0.2:
            return rng.choice([None, {}, {"gov_rep_penalty": 1.0}, {"gov_ngram_size": 2}])
        return {
            "gov_rep_penalty": rng.choice([1.1, 1.5, 3.0]),
            "gov_rep_window": rng.choice([0, 0, 1, 3, 8, 40]),
            "gov_rep_scope": rng.choice(["output", "all"]),
            "gov_rep_exempt": encode_ids(rng.sample(range(vocab + 5), rng.choice([0, 2, 4]))),
        }

    return make


CASES = {
    "dry": (DRYLogitsProcessor, ReferenceDRY, dry_reference, dry_args),
    "ngram": (NoRepeatNGramLogitsProcessor, ReferenceNGram, ngram_reference, ngram_args),
    "window_penalty": (WindowedRepetitionPenaltyLogitsProcessor, ReferencePenalty, penalty_reference, penalty_args),
}


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(sorted(CASES)),
    seed=st.integers(0, 2**31),
    vocab=st.sampled_from([6, 12, 40]),
    batch_size=st.integers(2, 9),
)
def test_batched_equals_reference_under_random_batches(name: str, seed: int, vocab: int, batch_size: int) -> None:
    batched_cls, reference_cls, rule, make_args = CASES[name]
    pair = Lockstep(make_processor(batched_cls, vocab), make_processor(reference_cls, vocab))
    random_session(pair, rule, make_args(vocab), seed, vocab=vocab, batch_size=batch_size, steps=50)
    assert pair.steps == 50


@given(name=st.sampled_from(sorted(CASES)), seed=st.integers(0, 2**31))
@settings(max_examples=9, deadline=None, derandomize=True)
def test_batched_equals_reference_in_a_steady_batch(name: str, seed: int) -> None:
    # No churn: rows 0..n-1 hold slots 0..n-1, the layout where the batched path uses slices.
    batched_cls, reference_cls, rule, make_args = CASES[name]
    rng, vocab = random.Random(seed), 12
    pair = Lockstep(make_processor(batched_cls, vocab), make_processor(reference_cls, vocab))
    sim = BatchSim(pair, batch_size=5)
    requests = [sim.add(i, make_args(vocab)(rng), [next_token(rng, [], vocab) for _ in range(6)]) for i in range(5)]
    sim.flush()
    for _ in range(90):
        for request in requests:
            request.output.append(next_token(rng, request.prompt + request.output, vocab))
        sim.flush()
        sim.check(rule, rng, vocab)
    assert pair.steps == 90


@given(name=st.sampled_from(sorted(CASES)), seed=st.integers(0, 2**31))
@settings(max_examples=6, deadline=None, derandomize=True)
def test_batched_equals_reference_over_long_outputs(name: str, seed: int) -> None:
    # Long enough that the aligned history runs out of columns and is moved back left several
    # times (rows finish and shorter ones replace them), with rows of different settings.
    batched_cls, reference_cls, rule, make_args = CASES[name]
    rng, vocab = random.Random(seed), 12
    batched = make_processor(batched_cls, vocab)
    pair = Lockstep(batched, make_processor(reference_cls, vocab))
    sim = BatchSim(pair, batch_size=4)
    moves = long_outputs(sim, rng, vocab, rule, lambda first: make_args(vocab)(rng), lambda: batched.now)
    assert pair.steps == 400 and moves >= 2
