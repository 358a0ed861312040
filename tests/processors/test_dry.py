"""DRYLogitsProcessor against a direct port of text-generation-webui's DRY sampler."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from governor.processors.dry import DRYLogitsProcessor
from governor.processors.extra_args import encode_ids

from .harness import BatchSim, make_processor, random_session

VOCAB = 12


def dry_reference(prompt: list[int], output: list[int], args: dict[str, Any], row: torch.Tensor) -> torch.Tensor:
    """text-generation-webui's DRYLogitsProcessor.__call__ for one row, full scan, no index."""
    multiplier = float(args.get("gov_dry_multiplier", 0.0))
    base = float(args.get("gov_dry_base", 1.75))
    allowed_length = int(args.get("gov_dry_allowed_length", 2))
    lookback = int(args.get("gov_dry_range", 0))
    breakers = {int(t) for t in args.get("gov_dry_breakers", "").split(",") if t}
    input_ids = output if args.get("gov_dry_scope") == "output" else prompt + output
    if lookback > 0:
        input_ids = input_ids[-lookback:]
    if multiplier <= 0 or not input_ids:
        return row
    last_token = input_ids[-1]
    if last_token in breakers:
        return row
    match_indices = [idx for idx, val in enumerate(input_ids[:-1]) if val == last_token]
    match_lengths: dict[int, int] = {}
    for i in match_indices:
        next_token = input_ids[i + 1]
        if next_token in breakers:
            continue
        match_length = 1
        while match_length < 50:
            j = i - match_length
            if j < 0:
                break
            previous_token = input_ids[-(match_length + 1)]
            if input_ids[j] != previous_token or previous_token in breakers:
                break
            match_length += 1
        match_lengths[next_token] = max(match_length, match_lengths.get(next_token, 0))
    for token, match_length in match_lengths.items():
        if match_length >= allowed_length:
            row[token] -= multiplier * base ** (match_length - allowed_length)
    return row


def random_dry_args(rng: random.Random) -> dict[str, Any] | None:
    if rng.random() < 0.25:
        return rng.choice([None, {}, {"gov_dry_multiplier": 0.0}, {"gov_ngram_size": 2}])
    args: dict[str, Any] = {"gov_dry_multiplier": rng.choice([0.8, 1.0, 2.5])}
    if rng.random() < 0.5:
        args["gov_dry_base"] = rng.choice([1.0, 1.75, 3.0])
    if rng.random() < 0.5:
        args["gov_dry_allowed_length"] = rng.choice([1, 2, 3])
    if rng.random() < 0.5:
        args["gov_dry_range"] = rng.choice([0, 4, 9])
    if rng.random() < 0.4:
        args["gov_dry_breakers"] = encode_ids(rng.sample(range(VOCAB), 2))
    if rng.random() < 0.4:
        args["gov_dry_scope"] = rng.choice(["all", "output"])
    return args


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_under_batch_churn(seed: int) -> None:
    random_session(make_processor(DRYLogitsProcessor, VOCAB), dry_reference, random_dry_args, seed, vocab=VOCAB)


def test_hand_computed_penalty() -> None:
    # "1 2 3 4 1 2 3": the suffix "1 2 3" occurred before, followed by 4: a repeat of length 3.
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=1)
    args = {"gov_dry_multiplier": 1.0, "gov_dry_base": 2.0, "gov_dry_allowed_length": 2}
    sim.add(0, args, [1, 2, 3, 4], [1, 2, 3])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    expected = torch.zeros(1, VOCAB)
    expected[0, 4] = -2.0  # 1 * 2 ** (3 - 2)
    assert torch.equal(logits, expected)


def test_breaker_stops_the_match() -> None:
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=1)
    args = {"gov_dry_multiplier": 1.0, "gov_dry_base": 2.0, "gov_dry_allowed_length": 2, "gov_dry_breakers": "2"}
    sim.add(0, args, [1, 2, 3, 4], [1, 2, 3])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    # The match "3" cannot extend through the breaker 2, so its length 1 is below allowed_length.
    assert torch.equal(logits, torch.zeros(1, VOCAB))


@pytest.mark.parametrize(("scope", "penalised"), [("all", True), ("output", False)])
def test_output_scope_lets_the_output_copy_the_prompt(scope: str, penalised: bool) -> None:
    # "1 2 3 4" in the prompt, "1 2 3" so far in the output: copying on (4) repeats the prompt only.
    args = {"gov_dry_multiplier": 1.0, "gov_dry_base": 2.0, "gov_dry_allowed_length": 2, "gov_dry_scope": scope}
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=1)
    sim.add(0, args, [1, 2, 3, 4], [1, 2, 3])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert bool(logits[0, 4] == -2.0) is penalised and int((logits != 0).sum()) == int(penalised)
    # The output repeating itself is penalised in either scope: "5 6 7 8 5 6 7" -> 8 loses 2.
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=1)
    sim.add(0, args, [1, 2, 3, 4], [5, 6, 7, 8, 5, 6, 7])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert logits[0, 8] == -2.0


def test_range_limits_the_lookback() -> None:
    args = {"gov_dry_multiplier": 1.0, "gov_dry_allowed_length": 2, "gov_dry_range": 3}
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=1)
    sim.add(0, args, [1, 2, 3, 4], [1, 2, 3])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert torch.equal(logits, torch.zeros(1, VOCAB))


def test_huge_base_bans_instead_of_overflowing() -> None:
    args = {"gov_dry_multiplier": 1.0, "gov_dry_base": 1e300, "gov_dry_allowed_length": 1}
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=1)
    sim.add(0, args, [5, 6, 7] * 4, [])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert logits[0, 5].item() == -math.inf
    assert torch.isfinite(logits[0, torch.arange(VOCAB) != 5]).all()


def test_a_ban_never_reaches_a_breaker_or_an_id_past_the_vocabulary() -> None:
    # Earlier copies of "5 6 7" were followed by a breaker (0) and by an id past the vocabulary:
    # their infinite penalties have no logit to land on, and must not turn into nan elsewhere.
    args = {"gov_dry_multiplier": 1.0, "gov_dry_base": 1e300, "gov_dry_allowed_length": 1, "gov_dry_breakers": "0"}
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=1)
    sim.add(0, args, [5, 6, 7, 0, 5, 6, 7, VOCAB + 3, 5, 6, 7], [])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert torch.equal(logits, torch.zeros(1, VOCAB))


def test_long_repeat_is_capped() -> None:
    # 200 identical tokens: the match length stops at 50, so the penalty is base ** (50 - allowed).
    args = {"gov_dry_multiplier": 1.0, "gov_dry_base": 1.1, "gov_dry_allowed_length": 2}
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=1)
    sim.add(0, args, [3] * 200, [])
    sim.flush()
    logits = torch.zeros(1, VOCAB)
    sim.processor.apply(logits)
    assert logits[0, 3].item() == pytest.approx(-(1.1**48), rel=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_matches_reference_with_a_model_sized_vocabulary(seed: int) -> None:
    # Wide logits take the CPU path that points penalty-free cells at column 0.
    vocab = 5000
    random_session(make_processor(DRYLogitsProcessor, vocab), dry_reference, random_dry_args, seed, vocab=vocab)


def test_ranges_longer_than_the_cap_cut_only_where_they_bite() -> None:
    # Ranges above MAX_MATCH_LENGTH: the cut applies to the first columns of the window only.
    rng = random.Random(7)
    sim = BatchSim(make_processor(DRYLogitsProcessor, VOCAB), batch_size=3)
    ranges = (60, 90, 0)
    requests = [sim.add(i, {"gov_dry_multiplier": 1.0, "gov_dry_allowed_length": 1, "gov_dry_range": r}, [1, 2, 3] * 5)
                for i, r in enumerate(ranges)]  # fmt: skip
    sim.flush()
    for step in range(220):
        for request in requests:
            # Long verbatim repeats (matches past the cap) with the odd new token.
            out = request.prompt + request.output
            request.output.append(out[-3] if step % 37 else rng.randrange(VOCAB))
        sim.flush()
        sim.check(dry_reference, rng, VOCAB)
