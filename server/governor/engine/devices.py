"""Which GPUs each local engine gets when GOVERNOR_ENGINES=N on a GPU machine.

Enough GPUs (N x the devices one engine needs, from --tensor/--pipeline-parallel-size): each engine gets
its own, as CUDA_VISIBLE_DEVICES, with the full memory share. Fewer: engines share devices round-robin,
each with gpu_memory_utilization / (engines on its devices), and engines that share start one at a time
(vLLM checks free memory against its share at start: started together they race and some refuse).
An operator's CUDA_VISIBLE_DEVICES is honoured: only those devices are split, under their names.
Pure functions; the GPU count comes from a runner that tests replace.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineDevices:
    """One engine's share: the CUDA_VISIBLE_DEVICES value (None = leave the environment as it is),
    its --gpu-memory-utilization, and the group it starts in turn with (engines sharing devices)."""

    visible: str | None
    memory_utilization: float
    share_group: int | None = None


def nvidia_smi_list() -> str:
    """`nvidia-smi -L`'s output, or '' where there is no driver."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ""
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, timeout=15, check=False, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def visible_devices(cuda_visible: str | None, list_gpus: Callable[[], str] = nvidia_smi_list) -> list[str]:
    """The device names engines may use: the operator's CUDA_VISIBLE_DEVICES entries when set
    (indices or UUIDs, kept as written), else every GPU nvidia-smi lists, by index."""
    if cuda_visible is not None:
        return [d.strip() for d in cuda_visible.split(",") if d.strip()]
    count = sum(1 for line in list_gpus().splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(count)]


def devices_per_engine(engine_args: str) -> int:
    """GPUs one engine spans: tensor x pipeline parallel size from the extra vLLM arguments."""
    sizes = {"tp": 1, "pp": 1}
    names = {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp"}
    args = shlex.split(engine_args)
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key in names:
            value = value or (args[i + 1] if i + 1 < len(args) else "1")
            try:
                sizes[names[key]] = max(1, int(value))
            except ValueError:
                pass
    return sizes["tp"] * sizes["pp"]


def plan_devices(engines: int, devices: list[str], per_engine: int, utilization: float) -> list[EngineDevices]:
    """Each engine's devices and memory share (see the module docstring). One engine: as before, untouched."""
    if engines == 1 or not devices:
        return [EngineDevices(None, utilization) for _ in range(engines)]
    per_engine = min(per_engine, len(devices))
    groups = len(devices) // per_engine
    slots = [",".join(devices[g * per_engine : (g + 1) * per_engine]) for g in range(groups)]
    if engines <= groups:
        return [EngineDevices(slots[i], utilization) for i in range(engines)]
    # Round-robin: engine i on slot i % groups; each slot's engines split its memory and start in turn.
    on_slot = [len(range(g, engines, groups)) for g in range(groups)]
    return [
        EngineDevices(slots[i % groups], math.floor(utilization / on_slot[i % groups] * 1000) / 1000, i % groups)
        for i in range(engines)
    ]


def plan_engines(
    engines: int,
    device: str,
    engine_args: str,
    utilization: float,
    environ: Mapping[str, str] = os.environ,
    list_gpus: Callable[[], str] = nvidia_smi_list,
) -> list[EngineDevices]:
    """plan_devices for this machine: on the CPU profile every engine keeps the environment as it is."""
    if device != "gpu" or engines == 1:
        return [EngineDevices(None, utilization) for _ in range(engines)]
    found = visible_devices(environ.get("CUDA_VISIBLE_DEVICES"), list_gpus)
    return plan_devices(engines, found, devices_per_engine(engine_args), utilization)
