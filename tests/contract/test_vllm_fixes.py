"""Governor's vLLM plugin (engine/vllm_fixes.py) against the vLLM imported here: the LoRA ops it wraps are
where it looks for them, the wrapped ops leave rows without an adapter alone and compute the others as
vLLM does, and the plugin acts only in engines Governor starts."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from governor.engine.vllm_fixes import FIXES_ENV, GATHER_OPS, OPS_MODULES, aliases_last_slot, skip_unadapted

SLOTS, RANK, HIDDEN, OUT = 3, 4, 8, 6


@pytest.fixture(scope="module")
def shipped() -> dict[str, object]:
    module = importlib.import_module(OPS_MODULES[0])
    return {name: getattr(module, name) for name in GATHER_OPS}


def test_the_plugin_is_registered_with_vllm() -> None:
    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found.get("governor_fixes") == "governor.engine.vllm_fixes:register"


def test_every_module_it_patches_exists_and_holds_the_ops() -> None:
    for name in OPS_MODULES:
        module = importlib.import_module(name)
        assert any(hasattr(module, op) for op in GATHER_OPS), name


def calls(x: torch.Tensor, out: torch.Tensor, idx: torch.Tensor) -> dict[str, tuple[object, ...]]:
    """Arguments for each op: (inputs, weights, output, indices, *rest)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=gen)
    shrunk = torch.randn(len(idx), RANK, generator=gen)
    return {
        "bgmv_shrink": (x, a, torch.zeros(len(idx), RANK), idx, 0.5),
        "bgmv_expand": (shrunk, b, out.clone(), idx, True),
        "bgmv_expand_slice": (shrunk, b, torch.cat([out, out], 1), idx, OUT, OUT, True),
    }


@pytest.mark.parametrize("op", GATHER_OPS)
def test_rows_without_an_adapter_are_left_alone_and_the_rest_computed_as_vllm_does(
    shipped: dict[str, object], op: str
) -> None:
    idx = torch.tensor([-1, 0, 2, -1, 1])
    x, out = torch.randn(len(idx), HIDDEN), torch.randn(len(idx), OUT)
    inputs, weights, output, _, *rest = calls(x, out, idx)[op]
    untouched = output.clone()
    skip_unadapted(shipped[op])(inputs, weights, output, idx, *rest)  # type: ignore[arg-type]
    adapted = idx >= 0
    assert torch.equal(output[~adapted], untouched[~adapted])
    alone = untouched[adapted].clone()
    shipped[op](inputs[adapted], weights, alone, idx[adapted], *rest)  # type: ignore[operator]
    assert torch.allclose(output[adapted], alone, atol=1e-6)


def test_batches_all_with_or_all_without_adapters(shipped: dict[str, object]) -> None:
    op = skip_unadapted(shipped["bgmv_shrink"])  # type: ignore[arg-type]
    x, out = torch.randn(2, HIDDEN), torch.zeros(2, RANK)
    weights = torch.randn(SLOTS, 1, RANK, HIDDEN)
    op(x, weights, out, torch.tensor([-1, -1]), 1.0)
    assert not out.any()
    op(x, weights, out, torch.tensor([0, 2]), 1.0)
    expected = torch.zeros(2, RANK)
    shipped["bgmv_shrink"](x, weights, expected, torch.tensor([0, 2]), 1.0)  # type: ignore[operator]
    assert torch.equal(out, expected)
    assert not aliases_last_slot(op)


PROBE = """
import importlib
from governor.engine import vllm_fixes as f
f.register()
print(getattr(importlib.import_module(f.OPS_MODULES[0]).bgmv_shrink, "governor_fixed", False),
      f.aliases_last_slot(importlib.import_module(f.OPS_MODULES[-1]).bgmv_shrink))
"""


@pytest.mark.parametrize("enabled", [False, True])
def test_the_plugin_acts_only_in_governors_engines(shipped: dict[str, object], enabled: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != FIXES_ENV} | ({FIXES_ENV: "1"} if enabled else {})
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fixed, aliases = done.stdout.splitlines()[-1].split()  # the last line: vLLM may log to stdout first
    if enabled:  # wherever the CPU wrapper looks the ops up, none reads -1 as the last slot any more
        assert aliases == "False"
        assert fixed == str(aliases_last_slot(shipped["bgmv_shrink"]))  # type: ignore[arg-type]
    else:
        assert fixed == "False" and aliases == str(aliases_last_slot(shipped["bgmv_shrink"]))  # type: ignore[arg-type]


def test_the_gateway_does_not_import_torch_for_it() -> None:
    # engine/flags.py reads FIXES_ENV from the plugin's module: torch must stay out of the gateway's imports.
    code = "import sys, governor.engine.flags; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False"], done.stderr
