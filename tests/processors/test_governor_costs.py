"""What the Governor processor costs per step, counted on CPU as proxies for the GPU: real aten ops
(~ kernel launches), host-to-device uploads, ``pin_memory`` calls, device-to-host syncs and Python
calls, at 8, 64 and 1,024 rows, for a steady step (every row gains a token) and a change step
(requests finish and new ones take their rows), under the `balanced` preset.

Run with ``pytest -s`` to read the counts; the test asserts the budgets of issue 26 (point 1):
steady <= 12 ops, change <= 30, the same ops at every batch size, at most one upload and no sync or
pinning per step, Python calls constant in the batch size (steady) and linear in the rows changed.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from governor.policy.presets import BUILTIN_PRESETS
from governor.processors.dry import DRYLogitsProcessor
from governor.processors.extra_args import encode_ids
from governor.processors.governor import GovernorLogitsProcessor
from governor.processors.ngram import NoRepeatNGramLogitsProcessor
from governor.processors.window_penalty import WindowedRepetitionPenaltyLogitsProcessor

from .harness import BatchSim, make_processor

VOCAB = 49152  # SmolLM2's
SIZES = (8, 64, 1024)
SYNCING = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"}


def balanced_args() -> dict[str, Any]:
    """`balanced` as the policy sends it, with token ids standing in for its breakers and exemptions."""
    preset = BUILTIN_PRESETS["balanced"]
    return {
        "gov_dry_multiplier": preset["dry_multiplier"], "gov_dry_base": preset["dry_base"],
        "gov_dry_allowed_length": preset["dry_allowed_length"], "gov_dry_range": preset["dry_range"],
        "gov_dry_breakers": encode_ids([198, 25, 18, 24]), "gov_dry_scope": preset["dry_scope"],
        "gov_rep_penalty": preset["rep_penalty"], "gov_rep_window": preset["rep_window"],
        "gov_rep_scope": preset["rep_scope"], "gov_rep_exempt": encode_ids(range(15, 60)),
    }  # fmt: skip


class AtenOps(TorchDispatchMode):
    """Real aten ops (views excluded) and copies out of the processor's host buffers."""

    def __init__(self, host_buffers: Callable[[], set[int]]) -> None:
        super().__init__()
        self.names: list[str] = []
        self.uploads = 0
        self._host_buffers = host_buffers

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:
            self.names.append(str(func.overloadpacket.__name__))
            if func.overloadpacket.__name__ in ("copy_", "_to_copy"):
                sources = {a.untyped_storage().data_ptr() for a in args[1:2] if isinstance(a, torch.Tensor)}
                self.uploads += bool(sources & self._host_buffers())
        return func(*args, **(kwargs or {}))


class Syncs(TorchFunctionMode):
    """Calls that wait for the device, and memory pinning."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.pins = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.syncs.append(name)
        if name == "pin_memory" or (kwargs or {}).get("pin_memory"):
            self.pins += 1
        return func(*args, **(kwargs or {}))


class Profiled:
    """Wraps the processor: counts Python calls (and C calls made from Python) inside its methods only."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.rows = processor.rows
        self.calls = 0
        self.counting = False

    def _run(self, method: Callable[[Any], Any], arg: Any) -> Any:
        if not self.counting:
            return method(arg)

        def count(frame: Any, event: str, _: Any) -> None:
            if event in ("call", "c_call"):
                self.calls += 1

        sys.setprofile(count)
        try:
            return method(arg)
        finally:
            sys.setprofile(None)

    def update_state(self, update: Any) -> None:
        self._run(self.processor.update_state, update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self._run(self.processor.apply, logits)


class Load:
    """A batch of `rows` requests, each prompt 5-20 tokens, stepping like an engine."""

    def __init__(self, processor: Any, rows: int, args: dict[str, Any]) -> None:
        self.rng = random.Random(0)
        self.processor = processor
        self.profiled = Profiled(self.processor)
        self.sim = BatchSim(self.profiled, batch_size=rows)
        self.args = args
        self.logits = torch.zeros(rows, VOCAB)
        self.requests = {i: self.sim.add(i, args, self._prompt(i), self._tokens(3)) for i in range(rows)}
        self.sim.flush()
        self.apply()

    def _prompt(self, i: int) -> list[int]:
        return self._tokens(5 + i % 16)  # the same lengths at every batch size: the same widths

    def _tokens(self, count: int) -> list[int]:
        return [self.rng.randrange(60) for _ in range(count)]

    def apply(self) -> None:
        self.profiled.apply(self.logits)

    def steady(self) -> None:
        for request in self.requests.values():
            request.output.append(self.rng.randrange(60))
        self.sim.flush()  # no batch change: update_state(None), as vLLM does

    def change(self, finished: int) -> None:
        """`finished` requests end, new ones (no output yet) take their rows; the others gain a token."""
        for index in range(0, 2 * finished, 2):
            self.sim.remove(index)
            self.requests[index] = self.sim.add(index, self.args, self._prompt(index))
        for index, request in self.requests.items():
            if index >= 2 * finished or index % 2:
                request.output.append(self.rng.randrange(60))
        self.sim.flush()


def _host_buffers(processor: Any) -> Callable[[], set[int]]:
    uploads = getattr(processor, "uploads", None)
    if uploads is None:
        return set
    return lambda: {t.untyped_storage().data_ptr() for t in uploads._host if t.numel()}


def _clear_of_realignment(load: Load) -> None:
    """Steady steps until the history has room for a few more columns (a realignment, every ~longest
    steps, is measured on its own)."""
    history = getattr(load.processor, "history", None)
    while history is not None and history.now + 4 >= history.columns:
        load.steady()
        load.apply()


def up_to_a_realignment(load: Load, rows: int) -> None:
    """Every request replaced (histories stop growing, so the next realignment moves the history back
    left without growing it: the ones while histories still grow are warm-up, like buffer growth), then
    steady steps until the next apply realigns."""
    load.change(rows // 2)
    load.apply()
    for index in range(1, rows, 2):
        load.sim.remove(index)
        load.requests[index] = load.sim.add(index, load.args, load._prompt(index))
    load.steady()
    load.apply()
    history = load.processor.history
    while history.now + 1 < history.columns:
        load.steady()
        load.apply()
    load.steady()


def _measure(load: Load, step: Callable[[], None]) -> dict[str, Any]:
    """One step under the op and sync modes, then the same kind of step again counting Python calls."""
    _clear_of_realignment(load)
    step()
    with Syncs() as syncs, AtenOps(_host_buffers(load.processor)) as ops:
        load.apply()
    load.profiled.calls, load.profiled.counting = 0, True
    step()
    load.apply()
    load.profiled.counting = False
    return {"ops": ops.names, "uploads": ops.uploads, "pins": syncs.pins, "syncs": syncs.syncs,
            "calls": load.profiled.calls}  # fmt: skip


def _costs(cls: type, rows: int, finished: tuple[int, ...], cache_friendly: bool = False) -> dict[str, dict[str, Any]]:
    """The step costs; ``cache_friendly`` False counts the ops a GPU's torch path runs (the CPU-only
    redirect of DRY's cells without a penalty to column 0 left out: see ``SharedHistory``)."""
    processor = make_processor(cls, VOCAB)
    processor.history.cache_friendly = cache_friendly
    load = Load(processor, rows, balanced_args())
    for _ in range(3):  # warm-up: buffers, tables and staging reach their size; the step after an add
        load.change(max(finished))
        load.steady()
        load.apply()
        load.steady()
        load.apply()
    result = {"steady": _measure(load, load.steady)}
    for count in finished:
        result[f"change {count}"] = _measure(load, lambda count=count: load.change(count))
        load.steady()
        load.apply()
    up_to_a_realignment(load, rows)
    with Syncs() as syncs, AtenOps(_host_buffers(load.processor)) as ops:
        load.apply()  # the history is full: moved back left
    result["realign"] = {"ops": ops.names, "uploads": ops.uploads, "pins": syncs.pins, "syncs": syncs.syncs,
                         "calls": 0}  # fmt: skip
    return result


@pytest.fixture(scope="module")
def costs() -> dict[int, dict[str, dict[str, Any]]]:
    return {rows: _costs(GovernorLogitsProcessor, rows, (2, 4) if rows < 16 else (2, 4, 8)) for rows in SIZES}


def test_prints_and_bounds_the_costs_per_step(costs: dict[int, dict[str, dict[str, Any]]]) -> None:
    print()
    for rows, steps in costs.items():
        for kind, c in steps.items():
            print(f"governor balanced rows={rows:5d} {kind:9s} aten_ops={len(c['ops']):3d} uploads={c['uploads']} "
                  f"pin_memory={c['pins']} syncs={len(c['syncs'])} python_calls={c['calls']}")  # fmt: skip
    print("steady ops:", " ".join(costs[8]["steady"]["ops"]))
    print("change ops:", " ".join(costs[8]["change 2"]["ops"]))
    print("realign ops:", " ".join(costs[8]["realign"]["ops"]))
    for rows, steps in costs.items():
        for kind, c in steps.items():
            assert c["uploads"] <= 1 and c["pins"] == 0 and not c["syncs"], (rows, kind, c)
            assert len(c["ops"]) <= (12 if kind == "steady" else 30), (rows, kind, c["ops"])
    for kind in ("steady", "change 2", "change 4", "realign"):
        assert costs[8][kind]["ops"] == costs[64][kind]["ops"] == costs[1024][kind]["ops"], kind
        assert costs[8][kind]["calls"] == costs[64][kind]["calls"] == costs[1024][kind]["calls"], kind


# On CPU, with DRY and no ban, in place of DRY's lookup, gather and lowering over every cell (`index
# gather sub_ scatter_reduce_`): the cells whose match is long enough, found on the host (a read of
# the device's data: free on CPU, a wait on a GPU, hence CPU only), then the same work on those. A
# change step compares every cell's match (`le`); a steady step reads and compares only the cells its
# match update found continuing, in numpy on the host (no torch op).
CPU_DRY = ["add", "index", "add", "index_select", "index", "index", "sub_", "mul", "add", "scatter_reduce_"]
CPU_DRY_FOUND = {"steady": [], "change 2": ["le"]}  # the cells found and their starts read on the host


def test_the_cpu_path_lowers_only_the_matched_cells(costs: dict[int, dict[str, dict[str, Any]]]) -> None:
    """The CPU-only choices (see ``SharedHistory``) change DRY's part of a step and nothing else, with
    the same ops at every batch size; only ``ne``, ``masked_fill_`` (and on a change step ``le``) pass
    over every cell, with numpy's ``flatnonzero`` on the host."""
    for rows in (8, 1024):
        cpu = _costs(GovernorLogitsProcessor, rows, (2,), cache_friendly=True)
        print(f"cpu rows={rows} steady ops:", " ".join(cpu["steady"]["ops"]))
        for kind, found in CPU_DRY_FOUND.items():
            plain = list(costs[rows][kind]["ops"])
            lookup = len(plain) - 1 - plain[::-1].index("index")  # the match table's: the step's last index
            assert plain[lookup : lookup + 4] == ["index", "gather", "sub_", "scatter_reduce_"], plain
            plain[lookup : lookup + 4] = found + CPU_DRY
            assert cpu[kind]["ops"] == plain, (rows, kind, cpu[kind]["ops"])
            assert cpu[kind]["uploads"] <= 1 and cpu[kind]["pins"] == 0, (rows, kind, cpu[kind])


def test_python_calls_of_a_change_grow_with_the_rows_changed_only(costs: dict[int, dict[str, dict[str, Any]]]) -> None:
    big = costs[1024]
    per_row = (big["change 4"]["calls"] - big["change 2"]["calls"]) / 2
    assert 0 < per_row < 60
    assert big["change 8"]["calls"] == pytest.approx(big["change 4"]["calls"] + 4 * per_row, abs=4)


def test_prints_the_three_processors_for_comparison() -> None:
    class Chain:
        def __init__(self) -> None:
            self.parts = [make_processor(c, VOCAB) for c in (DRYLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                              WindowedRepetitionPenaltyLogitsProcessor)]  # fmt: skip
            self.rows = self.parts[0].rows

        def update_state(self, update: Any) -> None:
            for part in self.parts:
                part.update_state(update)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            for part in self.parts:
                logits = part.apply(logits)
            return logits

    print()
    for rows in (8, 64):
        load = Load(Chain(), rows, balanced_args())
        for _ in range(3):
            load.steady()
            load.apply()
        steady = _measure(load, load.steady)
        change = _measure(load, lambda load=load: load.change(2))
        print(
            f"three processors balanced rows={rows:5d} steady aten_ops={len(steady['ops'])} "
            f"python_calls={steady['calls']}; change 2 aten_ops={len(change['ops'])} python_calls={change['calls']}"
        )
