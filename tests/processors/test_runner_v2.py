"""The new-runner adapter against the three reference processors, driven like vLLM 0.32's Model Runner V2.

The request state is the installed vLLM's own ``RequestState`` (slots, free list, ``prompt_len``), wrapped
by its own ``LogitsProcRequestState``; every step's layout is its own ``LogitsContext``. Two parts are
stood in for on this CPU-only machine, and only these: ``UvaBuffer`` is vLLM's CPU variant
(``vllm/v1/worker/cpu/buffer_utils.py``, what the CPU worker patches in too), since the GPU one needs
pinned memory; and the runner's Triton kernels that apply staged writes and append sampled tokens
(no Triton CPU backend here) are replaced by plain writes into the same ``.gpu`` tensors.

Each step: requests arrive in recycled slots, finish, are preempted and come back with their output
as prefill, sit out a step, gain no token or two, and the rows are shuffled; the adapter's logits
must be ``torch.equal`` to DRY, then the n-gram ban, then the windowed penalty (the v1 processors,
fresh each step, in the order of ``engine/flags.py``), and close to the from-scratch rules. Skipped
on vLLM without the interface.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm import SamplingParams

pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor.interface")

from vllm.v1.worker.gpu import buffer_utils
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.states import RequestState

from governor.processors import runner_v2
from governor.processors.runner_v2 import SPEC_DECODING_REFUSED, GovernorRunnerV2Processor

from .harness import BatchSim, fake_vllm_config, make_processor, next_token
from .test_common import CountTorchCalls
from .test_governor import CHAIN, PRESET_LIKE, chained_rule, mixed_args

MAX_LEN = 160


class Runner:
    """The slots and token history of a V2 runner, and the adapter fed from them."""

    def __init__(self, vocab: int, slots: int) -> None:
        from vllm.v1.worker.cpu.buffer_utils import UvaBuffer

        self.vocab = vocab
        with pytest.MonkeyPatch.context() as patch:  # only while the buffers are made
            patch.setattr(buffer_utils, "UvaBuffer", UvaBuffer)
            self.states = RequestState(slots, MAX_LEN, 64, 0, vocab, torch.device("cpu"))
        lp_states = LogitsProcRequestState.from_request_state(self.states)
        self.processor = GovernorRunnerV2Processor(fake_vllm_config(vocab), lp_states)
        self.args: dict[str, Any] = {}  # request id -> extra_args
        self.serial = 0

    def add(self, args: Any, prompt: list[int], output: list[int] | None = None) -> str:
        """A request entering a slot from the free list, as ``GPUModelRunner.add_requests`` does."""
        req_id = f"r{self.serial}"
        self.serial += 1
        tokens = list(prompt) + list(output or [])
        self.states.add_request(req_id, len(prompt), tokens, 0, MAX_LEN)
        slot = self.states.req_id_to_index[req_id]
        for staged in (self.states.all_token_ids, self.states.total_len, self.states.num_computed_tokens):
            staged.clear_staged_writes()  # written directly: what apply_write's kernel would do
        self.states.all_token_ids.gpu[slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        self.states.total_len.gpu[slot] = len(tokens)
        self.args[req_id] = args
        self.processor.add_request(slot, SamplingParams(extra_args=args))
        return req_id

    def remove(self, req_id: str) -> None:
        self.states.remove_request(req_id)
        del self.args[req_id]

    def tokens(self, req_id: str) -> tuple[list[int], list[int]]:
        slot = self.states.req_id_to_index[req_id]
        length, prompt_len = int(self.states.total_len.gpu[slot]), int(self.states.prompt_len.np[slot])
        history = self.states.all_token_ids.gpu[slot, :length].tolist()
        return history[:prompt_len], history[prompt_len:]

    def history(self, req_id: str) -> list[int]:
        prompt, output = self.tokens(req_id)
        return prompt + output

    def sample(self, req_id: str, token: int) -> None:
        """The runner's post-sampling update: the token appended to the slot's history."""
        slot = self.states.req_id_to_index[req_id]
        length = int(self.states.total_len.gpu[slot])
        self.states.all_token_ids.gpu[slot, length] = token
        self.states.total_len.gpu[slot] = length + 1

    def step(self, order: list[str], generator: torch.Generator) -> torch.Tensor:
        """One apply over the requests in ``order``, checked against the chain and the rules; returns the logits."""
        slots = np.array([self.states.req_id_to_index[r] for r in order], dtype=np.int32)
        mapping = torch.from_numpy(slots)
        lengths = self.states.total_len.gpu[mapping]
        last = self.states.all_token_ids.gpu[mapping, (lengths - 1).clamp(min=0).long()]
        ctx = LogitsContext(
            expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=slots,
            expanded_local_pos=torch.zeros_like(mapping), input_ids=last, pos=lengths - 1,
            seq_lens_upper_bound_np=lengths.numpy(),
        )  # fmt: skip
        logits = torch.randn(len(order), self.vocab, generator=generator)
        original = logits.clone()
        expected = self.chain_logits(order, logits.clone())
        got = self.processor.apply(logits, ctx)
        assert torch.equal(got, expected), (got - expected).abs().nan_to_num().max()
        for row, req_id in enumerate(order):
            if self.args[req_id]:
                prompt, output = self.tokens(req_id)
                rule = chained_rule(prompt, output, self.args[req_id], original[row].clone())
                torch.testing.assert_close(got[row], rule, atol=1e-5, rtol=1e-5)
        return got

    def chain_logits(self, order: list[str], logits: torch.Tensor) -> torch.Tensor:
        """The three v1 processors, given this step's batch from scratch."""
        chain = [make_processor(cls, self.vocab) for cls in CHAIN]
        for processor in chain:
            sim = BatchSim(processor, batch_size=len(order))
            for row, req_id in enumerate(order):
                sim.add(row, self.args[req_id], *self.tokens(req_id))
            sim.flush()
            logits = processor.apply(logits)
        return logits


def drive(runner: Runner, seed: int, steps: int, make_args: Any) -> None:
    """Random arrivals, finishes, preemptions, rows sitting out and shuffles, checked every step."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    vocab, slots = runner.vocab, runner.states.max_num_reqs
    for _ in range(steps):
        live = list(runner.args)
        roll = rng.random()
        if roll < 0.3 and len(live) < slots:
            prompt = [next_token(rng, [], vocab) for _ in range(rng.randrange(0, 8))]
            runner.add(make_args(rng), prompt)
        elif roll < 0.42 and live:
            runner.remove(rng.choice(live))  # finished: its slot goes back to the free list
        elif roll < 0.5 and live:
            # Preempted and resumed: the same request re-enters (maybe another slot) with its output as prefill.
            victim = rng.choice(live)
            args, (prompt, output) = runner.args[victim], runner.tokens(victim)
            runner.remove(victim)
            runner.add(args, prompt, output)
        live = list(runner.args)
        order = [r for r in live if rng.random() > 0.1]  # some sit this step out
        rng.shuffle(order)
        if not order:
            continue
        runner.step(order, generator)
        for req_id in order:
            # Mostly one token; none for a prefill chunk; two when a step ran without calling apply
            # (vLLM skips it when no request in the batch needs any processing).
            for _ in range(rng.choice((1, 1, 1, 1, 1, 1, 0, 2))):
                history = runner.history(req_id)
                if len(history) < MAX_LEN:
                    runner.sample(req_id, next_token(rng, history, vocab))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), vocab=st.sampled_from([6, 12, 40]), slots=st.integers(2, 8))
def test_equals_the_three_processors_under_runner_v2_batches(seed: int, vocab: int, slots: int) -> None:
    drive(Runner(vocab, slots), seed, steps=50, make_args=mixed_args(vocab))


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31))
def test_equals_over_long_outputs(seed: int) -> None:
    # Long enough for the inner history to run out of columns and realign.
    drive(Runner(12, 4), seed, steps=140, make_args=lambda rng: rng.choice([PRESET_LIKE, None]))


def test_steady_steps_read_no_whole_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = Runner(16, 6)
    rng = random.Random(5)
    ids = [runner.add(PRESET_LIKE, [1, 2, 3, i]) for i in range(5)]
    generator = torch.Generator().manual_seed(5)
    runner.step(ids, generator)
    reads: list[int] = []
    original = GovernorRunnerV2Processor._row_tokens
    monkeypatch.setattr(GovernorRunnerV2Processor, "_row_tokens", lambda self, s: reads.append(s) or original(self, s))
    for _ in range(20):
        for req_id in ids:
            runner.sample(req_id, next_token(rng, runner.history(req_id), 16))
        runner.step(ids, generator)
    assert reads == []
    rng.shuffle(ids)  # a new layout moves rows; it reads nothing whole either
    runner.sample(ids[0], 3)
    runner.step(ids, generator)
    assert reads == []


def test_unused_costs_no_tensor_op() -> None:
    runner = Runner(16, 6)
    accepted = [runner.processor.add_request(i, SamplingParams(extra_args=args)) for i, args in enumerate(
        [None, {}, {"gov_dry_multiplier": 0}, {"gov_ngram_size": 0}, {"other": "x"}])]  # fmt: skip
    assert accepted == [False] * 5
    assert runner.processor.add_request(5, SamplingParams(extra_args=PRESET_LIKE)) is True
    ids = [runner.add(args, [1, 2, 3]) for args in (None, {}, {"other": 1})]
    slots = np.array([runner.states.req_id_to_index[r] for r in ids], dtype=np.int32)
    mapping = torch.from_numpy(slots)
    ctx = LogitsContext(mapping, mapping, slots, torch.zeros_like(mapping), mapping, mapping, slots)
    logits = torch.randn(3, 16)
    before = logits.clone()
    with CountTorchCalls() as counter:
        assert runner.processor.apply(logits, ctx) is logits
    assert counter.calls == 0 and torch.equal(logits, before)
    assert runner.processor.is_argmax_invariant() is False


def test_speculative_decoding_is_refused_at_engine_start() -> None:
    runner = Runner(16, 2)
    config = fake_vllm_config(16)
    config.speculative_config = object()
    with pytest.raises(ValueError, match="speculative decoding"):
        GovernorRunnerV2Processor(config, runner.processor.req_states)
    assert "draft" in SPEC_DECODING_REFUSED


@pytest.mark.parametrize("args", [{"gov_dry_multiplier": -1}, {"gov_ngram_size": 1.5}, {"gov_rep_exempt": [1]}])
def test_validate_params_rejects_every_control(args: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="gov_"):
        GovernorRunnerV2Processor.validate_params(SamplingParams(extra_args=args))


def test_the_new_runner_loads_it_by_name() -> None:
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    name = f"{GovernorRunnerV2Processor.__module__}:{GovernorRunnerV2Processor.__name__}"
    assert _load_v2_logitsprocs_by_fqcns([name]) == [GovernorRunnerV2Processor]
    assert runner_v2.HAS_RUNNER_V2_INTERFACE
