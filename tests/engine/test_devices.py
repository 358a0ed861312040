"""GOVERNOR_ENGINES=N on GPU machines: own devices when there are enough, a memory share when not."""

from __future__ import annotations

import pytest

from governor.engine.devices import (
    EngineDevices,
    devices_per_engine,
    plan_devices,
    plan_engines,
    visible_devices,
)

SMI_4 = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i}aaa)" for i in range(4)) + "\n"


def smi(text: str):  # type: ignore[no-untyped-def]
    return lambda: text


def test_visible_devices_from_nvidia_smi_or_the_operator() -> None:
    assert visible_devices(None, smi(SMI_4)) == ["0", "1", "2", "3"]
    assert visible_devices(None, smi("")) == []  # no driver
    assert visible_devices("2,3", smi(SMI_4)) == ["2", "3"]  # the operator's choice wins over what exists
    assert visible_devices("GPU-abc, GPU-def", smi(SMI_4)) == ["GPU-abc", "GPU-def"]  # UUIDs kept as written
    assert visible_devices("", smi(SMI_4)) == []


@pytest.mark.parametrize(
    ("args", "per"),
    [("", 1), ("--tensor-parallel-size 2", 2), ("-tp=4", 4), ("--tensor-parallel-size=2 --pipeline-parallel-size 2", 4),
     ("--enforce-eager", 1), ("-tp x", 1)],
)  # fmt: skip
def test_devices_per_engine(args: str, per: int) -> None:
    assert devices_per_engine(args) == per


def test_enough_gpus_each_engine_gets_its_own() -> None:
    plan = plan_devices(2, ["0", "1", "2", "3"], 1, 0.9)
    assert plan == [EngineDevices("0", 0.9), EngineDevices("1", 0.9)]
    assert all(p.share_group is None for p in plan)  # nothing shared: they start together
    assert plan_devices(2, ["0", "1", "2", "3"], 2, 0.9) == [EngineDevices("0,1", 0.9), EngineDevices("2,3", 0.9)]
    assert plan_devices(2, ["4", "6"], 1, 0.8) == [EngineDevices("4", 0.8), EngineDevices("6", 0.8)]


def test_one_gpu_shared_splits_memory_and_starts_in_turn() -> None:
    plan = plan_devices(3, ["0"], 1, 0.9)
    assert [p.visible for p in plan] == ["0", "0", "0"]
    assert all(p.memory_utilization == 0.3 for p in plan)
    assert {p.share_group for p in plan} == {0}  # one group: one start at a time
    assert sum(p.memory_utilization for p in plan) <= 0.9


def test_more_engines_than_gpus_round_robin() -> None:
    plan = plan_devices(3, ["0", "1"], 1, 0.9)
    assert [p.visible for p in plan] == ["0", "1", "0"]
    assert [p.memory_utilization for p in plan] == [0.45, 0.9, 0.45]
    assert plan[0].share_group == plan[2].share_group != plan[1].share_group
    shares = plan_devices(2, ["0"], 1, 0.85)
    assert sum(p.memory_utilization for p in shares) <= 0.85  # rounded down, never above the total


def test_tensor_parallel_wider_than_the_machine_shares_all_devices() -> None:
    plan = plan_devices(2, ["0", "1"], 4, 0.9)
    assert [p.visible for p in plan] == ["0,1", "0,1"] and all(p.memory_utilization == 0.45 for p in plan)


def test_cpu_one_engine_or_no_gpu_leave_the_environment_alone() -> None:
    untouched = [EngineDevices(None, 0.9)] * 2
    assert plan_engines(2, "cpu", "", 0.9, {}, smi(SMI_4)) == untouched
    assert plan_engines(1, "gpu", "", 0.9, {}, smi(SMI_4)) == [EngineDevices(None, 0.9)]
    assert plan_engines(2, "gpu", "", 0.9, {}, smi("")) == untouched


def test_plan_engines_honours_cuda_visible_devices() -> None:
    plan = plan_engines(2, "gpu", "", 0.9, {"CUDA_VISIBLE_DEVICES": "3"}, smi(SMI_4))
    assert [p.visible for p in plan] == ["3", "3"] and plan[0].memory_utilization == 0.45
    plan = plan_engines(2, "gpu", "", 0.9, {}, smi(SMI_4))
    assert [p.visible for p in plan] == ["0", "1"]
