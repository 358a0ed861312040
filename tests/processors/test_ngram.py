"""NoRepeatNGramLogitsProcessor against a from-scratch n-gram scan."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from governor.processors.ngram import NoRepeatNGramLogitsProcessor

from .harness import BatchSim, make_processor, random_session

VOCAB = 12


def ngram_reference(prompt: list[int], output: list[int], args: dict[str, Any], row: torch.Tensor) -> torch.Tensor:
    """HF's no_repeat_ngram rule over the last ``window`` output tokens, recomputed every call."""
    size = int(args.get("gov_ngram_size", 0))
    window = int(args.get("gov_ngram_window", 0))
    if size <= 0:
        return row
    recent = output[-window:] if window else output
    grams = {tuple(recent[i : i + size]) for i in range(len(recent) - size + 1)}
    if len(output) < size - 1:
        return row
    prefix = tuple(output[len(output) - size + 1 :]) if size > 1 else ()
    for token in range(row.shape[0]):
        if (*prefix, token) in grams:
            row[token] = float("-inf")
    return row


def random_ngram_args(rng: random.Random) -> dict[str, Any] | None:
    if rng.random() < 0.25:
        return rng.choice([None, {}, {"gov_ngram_size": 0}, {"gov_dry_multiplier": 1.0}])
    args: dict[str, Any] = {"gov_ngram_size": rng.choice([1, 2, 3, 4])}
    if rng.random() < 0.6:
        args["gov_ngram_window"] = rng.choice([0, 2, 5, 10])
    return args


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_under_batch_churn(seed: int) -> None:
    processor = make_processor(NoRepeatNGramLogitsProcessor, VOCAB)
    random_session(processor, ngram_reference, random_ngram_args, seed, vocab=VOCAB)


def test_prompt_is_not_counted() -> None:
    sim = BatchSim(make_processor(NoRepeatNGramLogitsProcessor, VOCAB), batch_size=1)
    sim.add(0, {"gov_ngram_size": 2}, [1, 2, 1], [])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert torch.equal(logits, torch.zeros(1, VOCAB))


def test_bans_completion_of_seen_trigram() -> None:
    sim = BatchSim(make_processor(NoRepeatNGramLogitsProcessor, VOCAB), batch_size=1)
    request = sim.add(0, {"gov_ngram_size": 3}, [], [1, 2, 3, 1])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert torch.isfinite(logits).all()  # prefix "3 1" never seen
    request.output.append(2)  # prefix "1 2" was followed by 3
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert logits[0, 3].item() == float("-inf")
    assert torch.isfinite(logits[0, torch.arange(VOCAB) != 3]).all()


def test_window_forgets_old_ngrams() -> None:
    sim = BatchSim(make_processor(NoRepeatNGramLogitsProcessor, VOCAB), batch_size=1)
    request = sim.add(0, {"gov_ngram_size": 2, "gov_ngram_window": 3}, [], [1, 2, 5, 6])
    sim.flush()
    request.output.append(1)  # "1 2" is now outside the last 3 tokens "5 6 1"
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("seed", range(2))
def test_matches_reference_with_a_model_sized_vocabulary(seed: int) -> None:
    # Wide logits take the CPU path that points cells that ban nothing at column 0.
    vocab = 5000
    processor = make_processor(NoRepeatNGramLogitsProcessor, vocab)
    random_session(processor, ngram_reference, random_ngram_args, seed, vocab=vocab)
