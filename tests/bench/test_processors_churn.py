"""`governor bench processors --synthetic --churn`: the replayed batch and the command's output, small."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from governor.bench import processors_churn as churn
from governor.bench.processors_synthetic import Shape, load_class
from governor.settings import Settings

XARGS = {"gov_dry_multiplier": 1.0, "gov_ngram_size": 3, "gov_rep_penalty": 1.2, "gov_rep_window": 16}


def follow(shadow: dict[int, int], update: BatchUpdate) -> None:
    """Apply an update the way the v1 interface documents it (removed, added, moved) to row -> request."""
    for row in update.removed:
        shadow.pop(row, None)
    for row, _, _, output in update.added:
        shadow[row] = id(output)
    for a, b, direction in update.moved:
        assert direction == MoveDirectionality.UNIDIRECTIONAL  # condense only moves one way
        shadow[b] = shadow.pop(a)


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_the_updates_describe_the_batch_and_replace_requests_at_batch_over_length(lag: int) -> None:
    rows, length, steps = 6, 8, 40
    batch = churn.ChurnBatch(Shape(rows, 50, 5, length), lag, SamplingParams(extra_args=XARGS), seed=1)
    shadow: dict[int, int] = {}
    follow(shadow, batch.start())
    seen: Counter[str] = Counter()
    for _ in range(steps):
        update = batch.step()
        if update is not None:
            follow(shadow, update)
            assert update.batch_size == batch.count
            seen.update(kind for kind in ("removed", "added", "moved") if getattr(update, kind))
            seen["change"] += 1
        assert None not in batch.rows and len(batch.rows) == batch.count
        assert shadow == {row: id(live.output) for row, live in enumerate(batch.rows)}
        assert all(len(live.output) < length for live in batch.rows)
        batch.sample()
    # A row stands empty for the lag, so a request is replaced every (length + lag) / rows steps.
    replaced = batch.drawn - rows
    assert abs(replaced - steps * rows / (length + lag)) <= 2
    assert seen["added"] and seen["change"] < steps  # some steps change the batch, some do not
    # Without a lag a newcomer takes the finished request's row: nothing left to condense.
    assert (seen["moved"] > 0) == (lag > 0) and (seen["removed"] > 0) == (lag > 0)


def test_churn_steps_time_steady_and_change_steps_for_both_sets() -> None:
    overhead = churn.clock_overhead(loops=50, tries=2)
    assert overhead >= 0
    for fqcns in churn.SETS.values():
        classes = [load_class(fqcn) for fqcn in fqcns]
        for host_only in (overhead, None):
            steps = churn.churn_steps(classes, XARGS, Shape(6, 64, 12, 8), torch.device("cpu"), 1, 20, 2, host_only)
            assert len(steps.steady) + len(steps.change) == 20
            assert steps.steady and steps.change and steps.moves
            assert steps.per_step >= 0 and set(steps.summary(1e6)) >= {"per_step", "steady_median", "change_median"}


def test_kernel_clock_counts_the_ops_it_leaves_out() -> None:
    clock = churn.KernelClock()
    with clock:
        (torch.ones(4) + 1).sum()
    assert clock.ops == 3 and clock.seconds > 0


def test_the_command_prints_host_scaling_and_the_comparison() -> None:
    lines = list(churn.run(Settings(), "cpu", [2, 6], 16, 8, 8, 1, 2, ["balanced"], 0, 1))
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == 2
    scaling, compared = records
    assert set(scaling["host_scaling"]) == {"governor", "separate"} and scaling["preset"] == "balanced"
    for name in ("governor", "separate"):
        per_size = scaling["host_us_per_step"][name]
        assert set(per_size) == {"2", "6"}
        assert all(size["change_steps"] > 0 for size in per_size.values())
        for label in ("steady_step_ms", "churn_step_ms"):
            assert set(compared["compare"][label][name]) == {"median", "min", "max"}
    assert compared["compare"]["rows"] == 6 and compared["vocab"] == scaling["vocab"] > 0
    assert "governor_over_separate" in compared["compare"]["steady_step_ms"]
    assert any("host_scaling 6/2 rows" in line for line in lines)
