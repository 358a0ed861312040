"""The Governor processor against today's three processors chained in vLLM's order, bit for bit.

Driven by the harness's random batch updates (adds, removes, moves, swaps, placeholders, dropped
and regenerated tokens) with requests mixing every control, scope, window, breaker and exemption;
after every step its logits must be ``torch.equal`` to DRY, then the n-gram ban, then the windowed
penalty applied by the per-control processors (the order of ``engine/flags.py``), and close to the
from-scratch rules.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm import SamplingParams

from governor.engine.flags import PROCESSORS as ENGINE_PROCESSORS
from governor.engine.flags import SEPARATE_PROCESSORS
from governor.processors.dry import DRYLogitsProcessor
from governor.processors.extra_args import encode_ids
from governor.processors.governor import GovernorLogitsProcessor
from governor.processors.ngram import NoRepeatNGramLogitsProcessor
from governor.processors.window_penalty import WindowedRepetitionPenaltyLogitsProcessor

from .harness import BatchSim, long_outputs, make_processor, next_token, random_session
from .test_common import CountTorchCalls
from .test_dry import dry_reference
from .test_ngram import ngram_reference
from .test_window_penalty import penalty_reference

CHAIN = [DRYLogitsProcessor, NoRepeatNGramLogitsProcessor, WindowedRepetitionPenaltyLogitsProcessor]


def test_chain_is_the_reference_the_engine_flags_name() -> None:
    """The Governor processor is what engines load; the chain it must equal is SEPARATE_PROCESSORS, in order."""
    names = [f"{cls.__module__}:{cls.__name__}" for cls in CHAIN]
    assert names == SEPARATE_PROCESSORS
    assert [f"{GovernorLogitsProcessor.__module__}:{GovernorLogitsProcessor.__name__}"] == ENGINE_PROCESSORS


class AgainstChain:
    """Feeds every update to the Governor processor and to the three references; apply() compares them."""

    def __init__(self, vocab: int) -> None:
        self.governor = make_processor(GovernorLogitsProcessor, vocab)
        self.chain = [make_processor(cls, vocab) for cls in CHAIN]
        self.rows = self.governor.rows
        self.steps = 0

    def update_state(self, update: Any) -> None:
        self.governor.update_state(update)
        for processor in self.chain:
            processor.update_state(update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        expected = logits.clone()
        for processor in self.chain:
            expected = processor.apply(expected)
        got = self.governor.apply(logits)
        assert got is logits
        assert torch.equal(got, expected), (got - expected).abs().nan_to_num().max()
        self.steps += 1
        return got


def chained_rule(prompt: list[int], output: list[int], args: dict[str, Any], row: torch.Tensor) -> torch.Tensor:
    for rule in (dry_reference, ngram_reference, penalty_reference):
        row = rule(prompt, output, args, row)
    return row


def mixed_args(vocab: int, ngram: bool = True) -> Any:
    def make(rng: random.Random) -> dict[str, Any] | None:
        if rng.random() < 0.15:
            return rng.choice([None, {}, {"gov_dry_multiplier": 0.0}, {"gov_rep_penalty": 1.0}, {"other": 1}])
        args: dict[str, Any] = {}
        if rng.random() < 0.7:
            args |= {
                "gov_dry_multiplier": rng.choice([0.5, 1.0, 2.5]),
                "gov_dry_base": rng.choice([1.0, 1.75, 3.0]),
                "gov_dry_allowed_length": rng.choice([1, 2, 3, 4]),
                "gov_dry_range": rng.choice([0, 0, 3, 9, 30]),
                "gov_dry_breakers": encode_ids(rng.sample(range(vocab + 2), rng.choice([0, 1, 3]))),
                "gov_dry_scope": rng.choice(["all", "all", "output"]),
            }
        if ngram and rng.random() < 0.5:
            args |= {"gov_ngram_size": rng.choice([1, 2, 3, 4, 6]), "gov_ngram_window": rng.choice([0, 0, 2, 5, 17])}
        if rng.random() < 0.7:
            args |= {
                "gov_rep_penalty": rng.choice([1.1, 1.5, 3.0]),
                "gov_rep_window": rng.choice([0, 0, 1, 3, 8, 40]),
                "gov_rep_scope": rng.choice(["output", "all"]),
                "gov_rep_exempt": encode_ids(rng.sample(range(vocab + 5), rng.choice([0, 2, 4]))),
            }
        return args

    return make


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), vocab=st.sampled_from([6, 12, 40]), batch_size=st.integers(2, 9))
def test_equals_the_three_processors_under_random_batches(seed: int, vocab: int, batch_size: int) -> None:
    pair = AgainstChain(vocab)
    random_session(pair, chained_rule, mixed_args(vocab), seed, vocab=vocab, batch_size=batch_size, steps=60)
    assert pair.steps == 60


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), vocab=st.sampled_from([6, 12, 40]), batch_size=st.integers(2, 9))
def test_equals_the_three_processors_without_the_ban(seed: int, vocab: int, batch_size: int) -> None:
    # Without the n-gram ban in the batch the CPU path lowers only the cells DRY matched
    # (``SharedHistory._penalize_matched``): every step of these sessions takes it.
    pair = AgainstChain(vocab)
    random_session(pair, chained_rule, mixed_args(vocab, ngram=False), seed, vocab=vocab, batch_size=batch_size,
                   steps=60)  # fmt: skip
    assert pair.steps == 60


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), batch_size=st.integers(2, 9))
def test_the_torch_path_off_cpu_gives_the_same_logits(seed: int, batch_size: int) -> None:
    # Without the CPU-only choices (DRY's matched cells found on the host, flat table lookups) the
    # torch path passes over every cell with a two-index table lookup: bit-identical too.
    pair = AgainstChain(vocab := 40)
    pair.governor.history.cache_friendly = False
    random_session(pair, chained_rule, mixed_args(vocab), seed, vocab=vocab, batch_size=batch_size, steps=60)
    assert pair.steps == 60


PRESET_LIKE: dict[str, Any] = {  # `strict`, with token ids standing in for its breakers and exemptions
    "gov_dry_multiplier": 1.5, "gov_dry_base": 1.75, "gov_dry_allowed_length": 2, "gov_dry_range": 2048,
    "gov_dry_breakers": encode_ids([0, 7]), "gov_ngram_size": 3, "gov_ngram_window": 512,
    "gov_rep_penalty": 1.15, "gov_rep_window": 128, "gov_rep_scope": "output", "gov_rep_exempt": encode_ids([1, 2]),
}  # fmt: skip


@given(seed=st.integers(0, 2**31))
@settings(max_examples=6, deadline=None, derandomize=True)
def test_equals_the_three_processors_over_long_outputs(seed: int) -> None:
    # Long enough that the history runs out of columns and is moved back left several times, rows
    # finish and others (with longer prompts, other settings) replace them.
    rng, vocab = random.Random(seed), 12
    pair = AgainstChain(vocab)
    sim = BatchSim(pair, batch_size=4)
    make_args = mixed_args(vocab)

    def args(first: bool) -> Any:
        return rng.choice([make_args(rng), PRESET_LIKE]) if first else make_args(rng)

    moves = long_outputs(sim, rng, vocab, chained_rule, args, lambda: pair.governor.history.now)
    assert pair.steps == 400 and moves >= 2


@given(
    seed=st.integers(0, 2**31),
    width=st.sampled_from([9, 12, 16]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    ban=st.booleans(),
)
@settings(max_examples=16, deadline=None, derandomize=True)
def test_equals_with_ids_past_the_vocabulary_and_other_logits(seed: int, width: int, dtype: str, ban: bool) -> None:
    # Prompt ids from a client's tokenizer past the vocabulary (12), logits narrower or wider than it
    # (padding), and bf16 logits: every case as the three processors do it.
    rng, vocab = random.Random(seed), 12
    pair = AgainstChain(vocab)
    sim = BatchSim(pair, batch_size=5)
    make_args = mixed_args(vocab, ngram=ban)
    requests = []
    for index in range(5):
        prompt = [rng.choice([rng.randrange(vocab), vocab + rng.randrange(3)]) for _ in range(rng.randrange(0, 9))]
        args = make_args(rng) or (PRESET_LIKE if ban else {**PRESET_LIKE, "gov_ngram_size": 0})
        requests.append(sim.add(index, {**args, "gov_dry_scope": "all", "gov_rep_scope": "all"}, prompt))
    sim.flush()
    for _ in range(40):
        for request in requests:
            request.output.append(next_token(rng, request.prompt + request.output, width))
        sim.flush()
        generator = torch.Generator().manual_seed(rng.randrange(1 << 30))
        pair.apply(torch.randn(5, width, generator=generator).to(getattr(torch, dtype)))


def test_several_updates_before_one_apply() -> None:
    # vLLM may refresh the batch more than once between two samplings (rows in prefill do not sample).
    rng, vocab = random.Random(3), 12
    pair = AgainstChain(vocab)
    sim = BatchSim(pair, batch_size=6)
    requests = {i: sim.add(i, PRESET_LIKE, [next_token(rng, [], vocab) for _ in range(5)]) for i in range(4)}
    for _ in range(60):
        for _ in range(rng.randrange(1, 4)):
            roll = rng.random()
            if roll < 0.3:
                a, b = rng.sample(range(6), 2)
                sim.swap(a, b)
                ra, rb = requests.pop(a, None), requests.pop(b, None)
                requests |= {k: v for k, v in ((b, ra), (a, rb)) if v is not None}
            elif roll < 0.5 and requests:
                a = rng.choice(list(requests))
                b = rng.randrange(6)
                sim.move(a, b)
                moved = requests.pop(a)
                requests.pop(b, None)
                requests[b] = moved
            elif roll < 0.7:
                index = rng.randrange(6)
                requests[index] = sim.add(index, rng.choice([PRESET_LIKE, mixed_args(vocab)(rng)]), [1, 2, 1, 2])
            sim.flush()
        for request in requests.values():
            request.output.append(next_token(rng, request.prompt + request.output, vocab))
        sim.check(chained_rule, rng, vocab)
    assert pair.steps == 60


def test_unused_costs_no_tensor_op_and_holds_no_history() -> None:
    sim = BatchSim(make_processor(GovernorLogitsProcessor, 16), batch_size=5)
    for index, args in enumerate([None, {}, {"gov_dry_multiplier": 0}, {"gov_ngram_size": 0}, {"other": "x"}]):
        sim.add(index, args, [1, 2, 3, 1, 2], [1, 2, 3, 1, 2])
    sim.flush()
    sim.flush()
    logits = torch.randn(5, 16)
    before = logits.clone()
    with CountTorchCalls() as counter:
        assert sim.processor.apply(logits) is logits
    assert counter.calls == 0 and torch.equal(logits, before)
    assert sim.processor.history.state.numel() == 0
    assert sim.processor.is_argmax_invariant() is False


@pytest.mark.parametrize(
    "args", [{"gov_dry_multiplier": -1}, {"gov_ngram_size": 1.5}, {"gov_rep_penalty": 0.5}, {"gov_rep_exempt": [1]}]
)
def test_validate_params_rejects_every_control(args: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="gov_"):
        GovernorLogitsProcessor.validate_params(SamplingParams(extra_args=args))


def test_arguments_are_parsed_once_per_distinct_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from governor.processors import request_configs

    calls = []
    original = request_configs.parse_dry
    monkeypatch.setattr(request_configs, "parse_dry", lambda args: calls.append(1) or original(args))
    sim = BatchSim(make_processor(GovernorLogitsProcessor, 64), batch_size=40)
    for index in range(40):
        sim.add(index, dict(PRESET_LIKE) if index % 2 else {**PRESET_LIKE, "gov_ngram_size": 4}, [1, 2, 3])
    sim.flush()
    sim.processor.apply(torch.randn(40, 64))
    assert len(calls) == 2
    assert len({id(request.config) for request in sim.processor.rows.values()}) == 2
    # 1, 1.0 and True are different arguments (True is refused), though they hash alike.
    sim.add(0, {**PRESET_LIKE, "gov_ngram_size": 3.0}, [1])
    sim.flush()
    with pytest.raises(ValueError, match="gov_ngram_size"):
        sim.add(1, {**PRESET_LIKE, "gov_ngram_size": True}, [1])
        sim.flush()


def test_history_is_bounded_by_the_engine_limits() -> None:
    model = SimpleNamespace(get_vocab_size=lambda: 50, max_model_len=300)
    config = SimpleNamespace(model_config=model, scheduler_config=SimpleNamespace(max_num_seqs=4))
    processor = GovernorLogitsProcessor(config, torch.device("cpu"), True)  # type: ignore[arg-type]
    assert not processor.uploads.pin  # never pinned on CPU
    sim = BatchSim(processor, batch_size=4)
    requests = [sim.add(i, {**PRESET_LIKE, "gov_rep_scope": "all"}, [i] * 100, [1] * 60) for i in range(4)]
    sim.flush()
    for _ in range(140):
        processor.apply(torch.randn(4, 50))
        for request in requests:
            request.output.append(len(request.output) % 50)
    # Rows for max_num_seqs; columns twice the longest history plus the match lookback (50) and two.
    assert processor.history.rows == 4 and processor.history.columns <= 2 * (300 + 50 + 2)
