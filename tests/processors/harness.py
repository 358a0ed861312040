"""A stand-in for vLLM's persistent batch, to drive logits processors the way the engine does.

`BatchUpdate`, `MoveDirectionality` and `SamplingParams` are the installed vLLM's own, imported from
their public homes, never copied: `make contract-0.25` runs these tests again with vLLM 0.25.0 first on
PYTHONPATH, so every batch-update test checks the processors against both ends of the supported range.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

Args = dict[str, Any] | None
# (prompt, settled output, extra_args, logits row) -> expected logits row
Reference = Callable[[list[int], list[int], dict[str, Any], torch.Tensor], torch.Tensor]


def fake_vllm_config(vocab_size: int) -> Any:
    """The only part of VllmConfig the processors read."""
    return SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: vocab_size))


def make_processor(cls: type[LogitsProcessor], vocab_size: int) -> Any:
    return cls(fake_vllm_config(vocab_size), torch.device("cpu"), False)


@dataclass
class Request:
    args: Args
    prompt: list[int]
    output: list[int]


@dataclass
class BatchSim:
    """Rows of a persistent batch plus the pending BatchUpdate, applied in vLLM's order."""

    processor: Any
    batch_size: int
    rows: dict[int, Request] = field(default_factory=dict)
    removed: list[int] = field(default_factory=list)
    added: list[tuple[int, Request]] = field(default_factory=list)
    moved: list[tuple[int, int, MoveDirectionality]] = field(default_factory=list)

    def add(self, index: int, args: Args, prompt: list[int], output: list[int] | None = None) -> Request:
        request = Request(args, list(prompt), list(output or []))
        self.added.append((index, request))
        return request

    def remove(self, index: int) -> None:
        self.removed.append(index)

    def move(self, a: int, b: int) -> None:
        self.moved.append((a, b, MoveDirectionality.UNIDIRECTIONAL))

    def swap(self, a: int, b: int) -> None:
        self.moved.append((a, b, MoveDirectionality.SWAP))

    def flush(self) -> None:
        """Hand the pending changes to the processor (None when there are none, as vLLM does)."""
        if not (self.removed or self.added or self.moved):
            self.processor.update_state(None)
            return
        update = BatchUpdate(
            batch_size=self.batch_size,
            removed=list(self.removed),
            added=[(i, SamplingParams(extra_args=r.args), r.prompt, r.output) for i, r in self.added],
            moved=list(self.moved),
        )
        for index in self.removed:
            self.rows.pop(index, None)
        for index, request in self.added:
            self.rows[index] = request
        for a, b, direction in self.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = row_b
        self.removed, self.added, self.moved = [], [], []
        self.processor.update_state(update)

    def check(self, reference: Reference, rng: random.Random, vocab: int) -> None:
        """Apply the processor to random logits and compare every row with the reference."""
        logits = torch.randn(self.batch_size, vocab, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        expected = logits.clone()
        for index, request in self.rows.items():
            if request.args:
                settled = list(request.output)
                while settled and settled[-1] < 0:
                    settled.pop()
                expected[index] = reference(request.prompt, settled, request.args, logits[index].clone())
        got = self.processor.apply(logits)
        torch.testing.assert_close(got, expected)


def next_token(rng: random.Random, history: list[int], vocab: int) -> int:
    """Mostly tokens that continue an earlier repeat, so loops and n-gram hits actually occur."""
    if history and rng.random() < 0.6:
        anchor = rng.randrange(len(history))
        if anchor + 1 < len(history):
            return history[anchor + 1]
    return rng.randrange(min(vocab, 5)) if rng.random() < 0.7 else rng.randrange(vocab)


def random_session(
    processor: Any,
    reference: Reference,
    make_args: Callable[[random.Random], Args],
    seed: int,
    vocab: int = 12,
    batch_size: int = 6,
    steps: int = 60,
) -> BatchSim:
    """Random adds, removes, moves, swaps, placeholders and truncations, checked after each step."""
    rng = random.Random(seed)
    sim = BatchSim(processor, batch_size)
    for _ in range(steps):
        roll = rng.random()
        occupied = list(sim.rows)
        if roll < 0.35:
            index = rng.randrange(batch_size)  # may replace a row vLLM never reported removed
            prompt = [next_token(rng, [], vocab) for _ in range(rng.randrange(0, 8))]
            output = [next_token(rng, prompt, vocab) for _ in range(rng.choice((0, 0, 3)))]
            sim.add(index, make_args(rng), prompt, output)
        elif roll < 0.45 and occupied:
            sim.remove(rng.choice(occupied))
        elif roll < 0.55:
            sim.swap(*rng.sample(range(batch_size), 2))
        elif roll < 0.65 and occupied:
            sim.move(rng.choice(occupied), rng.randrange(batch_size))
        elif roll < 0.7 and occupied:
            # Add and remove in the same step, on different rows.
            target = rng.randrange(batch_size)
            sim.remove(target)
            free = [i for i in range(batch_size) if i != target]
            sim.add(rng.choice(free), make_args(rng), [1, 2, 1, 2])
        sim.flush()
        for request in sim.rows.values():
            out = request.output
            while out and out[-1] < 0:
                out[-1] = next_token(rng, request.prompt + out[:-1], vocab)
            event = rng.random()
            if event < 0.05 and out:
                del out[-rng.randint(1, len(out)) :]
            elif event < 0.08 and out:
                # The last token dropped and regenerated differently: same length, new content.
                out[-1] = (out[-1] + 1) % vocab
            elif event < 0.12:
                out.append(-1)  # an async-scheduling placeholder still present at apply time
            else:
                for _ in range(rng.choice((1, 1, 1, 2))):
                    out.append(next_token(rng, request.prompt + out, vocab))
        sim.check(reference, rng, vocab)
    return sim


def long_outputs(
    sim: BatchSim,
    rng: random.Random,
    vocab: int,
    rule: Callable[..., Any],
    args: Callable[[bool], Any],
    now: Callable[[], int],
    steps: int = 400,
) -> int:
    """Four rows over `steps` steps: all replaced every 90 steps, one replaced mid-way by a request with a
    70-token prompt, each step checked against `rule`. `args(first)` gives a new request's arguments (first:
    one of the four started together). Returns how often the history moved back left (`now` went down)."""
    requests: dict[int, Any] = {}
    moves = 0
    for step in range(steps):
        if step % 90 == 0:
            for index in range(4):
                if index in requests:
                    sim.remove(index)
                prompt = [next_token(rng, [], vocab) for _ in range(rng.randrange(1, 12))]
                requests[index] = sim.add(index, args(True), prompt)
        elif step % 90 == 45:
            index = rng.randrange(4)
            sim.remove(index)
            requests[index] = sim.add(index, args(False), [next_token(rng, [], vocab) for _ in range(70)])
        sim.flush()
        before = now()
        sim.check(rule, rng, vocab)
        moves += now() < before
        for request in requests.values():
            request.output.append(next_token(rng, request.prompt + request.output, vocab))
    return moves
