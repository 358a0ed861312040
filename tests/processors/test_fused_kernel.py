"""The Governor processor's fused Triton path (what CUDA engines run), checked on CPU.

Equivalence: under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors, small sizes) the fused
processor's logits equal the three reference processors' within 1e-5 with the same argmax, through
the harness's random batch updates (adds, removes, moves, swaps, placeholders, truncation), long
outputs that move the history back left, ids past the vocabulary, narrow and bf16 logits, and NaN,
infinite and signed-zero logits, at block sizes small enough that every loop crosses block edges.
The interpreter must be chosen before Triton is first imported, so those checks
(``interpreted_checks``) run in a child process.

Costs, counted with a fake launcher that runs nothing (the host side is the real one), at 8, 64
and 1,024 rows: one launch per steady step, at most two on a change step, one upload, no pinning,
no device-to-host reads, and no tensor op besides the upload. Run with ``pytest -s`` to read them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from governor.processors.extra_args import encode_ids
from governor.processors.fused_step import FusedSteps
from governor.processors.governor import GovernorLogitsProcessor
from governor.processors.launches import Launcher

from .harness import BatchSim, long_outputs, make_processor, next_token, random_session
from .test_governor import CHAIN, PRESET_LIKE, chained_rule, mixed_args
from .test_governor_costs import (
    VOCAB,
    AtenOps,
    Load,
    Syncs,
    _clear_of_realignment,
    _host_buffers,
    balanced_args,
    up_to_a_realignment,
)

ROOT = Path(__file__).resolve().parents[2]
DONE = "interpreted checks passed:"


class RecordingLauncher(Launcher):
    """The real launcher, also recording each launch's kernel name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __call__(self, name: str, grid: int, *args: Any, **constants: Any) -> None:
        self.names.append(name)
        super().__call__(name, grid, *args, **constants)


class FakeLauncher(RecordingLauncher):
    """Counts and records launches, runs nothing: for counting at sizes the interpreter cannot run."""

    def run(self, name: str, grid: int, args: tuple[Any, ...], constants: dict[str, Any]) -> None:
        return None


def fused_processor(vocab: int, launcher: Launcher, block: int = 64) -> Any:
    processor = make_processor(GovernorLogitsProcessor, vocab)
    processor.fused = FusedSteps(processor.device, launcher, block)
    return processor


# ---- equivalence, under the interpreter (child process) ---------------------------------------------


class AgainstReferences:
    """Feeds every update to the fused processor and to the three references; apply() compares them
    and checks the launches of the step."""

    def __init__(self, vocab: int, block: int) -> None:
        self.launcher = RecordingLauncher()
        self.fused = fused_processor(vocab, self.launcher, block)
        self.chain = [make_processor(cls, vocab) for cls in CHAIN]
        self.rows = self.fused.rows
        self.steps = self.exact = 0

    def update_state(self, update: Any) -> None:
        self.fused.update_state(update)
        for processor in self.chain:
            processor.update_state(update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        expected = logits.clone()
        for processor in self.chain:
            expected = processor.apply(expected)
        before = len(self.launcher.names)
        got = self.fused.apply(logits)
        launches = self.launcher.names[before:]
        assert got is logits
        if self.fused.batch.requests:
            assert launches in (["step_kernel"], ["change_kernel", "step_kernel"]), launches
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, equal_nan=True)
        assert torch.equal(got.float().argmax(1), expected.float().argmax(1))
        self.exact += torch.equal(got.nan_to_num(), expected.nan_to_num())
        self.steps += 1
        return got


def _random_sessions() -> str:
    pairs = []
    for seed, vocab, batch_size, block in ((0, 12, 6, 16), (1, 40, 9, 64), (2, 6, 3, 16), (3, 12, 8, 32)):
        pair = AgainstReferences(vocab, block)
        random_session(pair, chained_rule, mixed_args(vocab), seed, vocab=vocab, batch_size=batch_size, steps=30)
        assert pair.steps == 30
        pairs.append(pair)
    return f"random sessions: {sum(p.exact for p in pairs)}/{sum(p.steps for p in pairs)} steps bit-identical"


def _long_outputs() -> str:
    rng, vocab = random.Random(5), 12
    pair = AgainstReferences(vocab, 64)
    sim = BatchSim(pair, batch_size=4)
    make_args = mixed_args(vocab)
    # Seed and length chosen so the history moves back left (at step 64) within the steps the
    # interpreter can afford.
    moves = long_outputs(sim, rng, vocab, chained_rule, lambda first: make_args(rng), lambda: pair.fused.history.now,
                         steps=80)  # fmt: skip
    assert moves >= 1
    return f"long outputs: {pair.exact}/{pair.steps} bit-identical, history moved back {moves}x"


def _other_logits() -> str:
    # Prompt ids past the vocabulary (12), logits narrower and wider than it, bf16.
    exact = steps = 0
    for seed, width, dtype in ((0, 9, torch.float32), (1, 16, torch.bfloat16), (2, 12, torch.bfloat16)):
        rng, vocab = random.Random(seed), 12
        pair = AgainstReferences(vocab, 16)
        sim = BatchSim(pair, batch_size=4)
        requests = []
        for index in range(4):
            prompt = [rng.choice([rng.randrange(vocab), vocab + rng.randrange(3)]) for _ in range(rng.randrange(9))]
            args = {**(mixed_args(vocab)(rng) or PRESET_LIKE), "gov_dry_scope": "all", "gov_rep_scope": "all"}
            requests.append(sim.add(index, args, prompt))
        sim.flush()
        for _ in range(12):
            for request in requests:
                request.output.append(next_token(rng, request.prompt + request.output, width))
            sim.flush()
            pair.apply(torch.randn(4, width, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))).to(dtype))
        exact, steps = exact + pair.exact, steps + pair.steps
    return f"other logits: {exact}/{steps} bit-identical"


def _special_values() -> str:
    # NaN, infinities and signed zeros on tokens the history holds (and so every control lowers).
    rng, vocab = random.Random(7), 12
    pair = AgainstReferences(vocab, 16)
    sim = BatchSim(pair, batch_size=3)
    args = {**PRESET_LIKE, "gov_dry_breakers": encode_ids([]), "gov_rep_exempt": encode_ids([])}
    requests = [sim.add(index, args, [1, 2, 3, 1, 2]) for index in range(3)]
    sim.flush()
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0]
    for _ in range(10):
        for request in requests:
            request.output.append(next_token(rng, request.prompt + request.output, 5))
        sim.flush()
        logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        for row in range(3):
            for token in rng.sample(range(5), 3):
                logits[row, token] = rng.choice(specials)
        expected = logits.clone()
        for processor in pair.chain:
            expected = processor.apply(expected)
        got = pair.apply(logits)
        # Same values bit for bit where both are numbers, the sign of zeros included.
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num().view(torch.int32), expected.nan_to_num().view(torch.int32))
    return f"special values: {pair.exact}/{pair.steps} bit-identical"


def interpreted_checks() -> None:
    """Run in a child process with ``TRITON_INTERPRET=1`` (see the module docstring); raises on a mismatch."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = [check() for check in (_random_sessions, _long_outputs, _other_logits, _special_values)]
    print("\n".join(results))
    print(DONE, len(results))


@pytest.mark.interpreter
def test_fused_kernel_equals_the_references_under_the_interpreter() -> None:
    code = "from tests.processors.test_fused_kernel import interpreted_checks; interpreted_checks()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)  # fmt: skip
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    assert f"{DONE} 4" in done.stdout


# ---- costs, with the fake launcher --------------------------------------------------------------------


def _measure(load: Load, launcher: FakeLauncher, step: Callable[[], None] | None) -> dict[str, Any]:
    if step is not None:
        _clear_of_realignment(load)
        step()
    before = len(launcher.names)
    with Syncs() as syncs, AtenOps(_host_buffers(load.processor)) as ops:
        load.apply()
    return {"launches": launcher.names[before:], "ops": ops.names, "uploads": ops.uploads, "pins": syncs.pins,
            "syncs": syncs.syncs}  # fmt: skip


def _condense(load: Load, rows: int) -> None:
    """Row 0's request finishes and vLLM moves the last row's into its place (the others gain a token)."""
    load.sim.remove(0)
    load.sim.move(rows - 1, 0)
    load.requests[0] = load.requests.pop(rows - 1)
    for request in load.requests.values():
        request.output.append(load.rng.randrange(60))
    load.sim.flush()


def _fused_costs(rows: int) -> dict[str, dict[str, Any]]:
    launcher = FakeLauncher()
    load = Load(fused_processor(VOCAB, launcher), rows, balanced_args())
    for _ in range(3):  # warm-up: buffers and tables reach their size
        load.change(4)
        load.steady()
        load.apply()
        load.steady()
        load.apply()
    for _ in range(2):  # and the buffer moved rows are set aside in
        _condense(load, rows)
        load.apply()
        load.requests[rows - 1] = load.sim.add(rows - 1, load.args, load._prompt(rows - 1))
        load.steady()
        load.apply()
    result = {"steady": _measure(load, launcher, load.steady)}
    for count in (2, 4):
        result[f"change {count}"] = _measure(load, launcher, lambda count=count: load.change(count))
        load.steady()
        load.apply()
    result["change+move"] = _measure(load, launcher, lambda: _condense(load, rows))
    load.requests[rows - 1] = load.sim.add(rows - 1, load.args, load._prompt(rows - 1))
    load.steady()
    load.apply()
    up_to_a_realignment(load, rows)
    result["realign"] = _measure(load, launcher, None)
    return result


def test_prints_and_bounds_the_launches_per_step() -> None:
    costs = {rows: _fused_costs(rows) for rows in (8, 64, 1024)}
    print()
    for rows, steps in costs.items():
        for kind, c in steps.items():
            print(f"fused balanced rows={rows:5d} {kind:9s} launches={len(c['launches'])} uploads={c['uploads']} "
                  f"pin_memory={c['pins']} syncs={len(c['syncs'])} torch_ops={' '.join(c['ops'])}")  # fmt: skip
    for rows, steps in costs.items():
        for kind, c in steps.items():
            assert c["uploads"] == 1 and c["pins"] == 0 and not c["syncs"], (rows, kind, c)
            assert c["launches"][-1] == "step_kernel" and len(c["launches"]) <= 2, (rows, kind, c["launches"])
        assert steps["steady"]["launches"] == ["step_kernel"]
        assert steps["change+move"]["launches"] == ["change_kernel", "step_kernel"]
        # Everything but the upload runs in the kernels; only a realignment reshapes with torch ops.
        for kind in ("steady", "change 2", "change 4", "change+move"):
            assert steps[kind]["ops"] == ["copy_"], (rows, kind, steps[kind]["ops"])
    for kind in ("steady", "change 2", "change 4", "change+move", "realign"):
        assert costs[8][kind]["ops"] == costs[64][kind]["ops"] == costs[1024][kind]["ops"], kind
        assert costs[8][kind]["launches"] == costs[64][kind]["launches"] == costs[1024][kind]["launches"], kind


def test_the_processor_imports_and_runs_on_cpu_without_triton() -> None:
    code = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "from tests.processors.harness import make_processor\n"
        "from governor.processors.governor import GovernorLogitsProcessor\n"
        "processor = make_processor(GovernorLogitsProcessor, 12)\n"
        "assert processor.fused is None and 'governor.processors.fused_kernel' not in sys.modules\n"
        "print('imported without triton')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "imported without triton" in done.stdout, done.stderr[-4000:]
