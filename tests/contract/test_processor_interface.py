"""Governor's logits processors fit this vLLM's v1 LogitsProcessor interface.

The behaviour under batch changes is tested by tests/processors, whose harness drives the processors
with this vLLM's own BatchUpdate; `make contract-0.25` runs those tests in the 0.25 process too.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.v1.sample import logits_processor as lp

from governor.engine.flags import PROCESSORS as FQCNS
from tests.contract import vllm_under_test as vut
from tests.processors import harness


def test_the_harness_drives_the_processors_with_this_vllms_classes() -> None:
    assert harness.BatchUpdate is lp.BatchUpdate
    assert harness.MoveDirectionality is lp.MoveDirectionality
    assert harness.SamplingParams is SamplingParams
    # Resolved as vut.PACKAGE is: a venv reached through a symlink must not look like another vLLM.
    assert Path(inspect.getfile(lp.BatchUpdate)).resolve().is_relative_to(vut.PACKAGE)


def test_vllm_loads_every_processor_by_its_engine_flag_name() -> None:
    loaded = lp._load_custom_logitsprocs(tuple(FQCNS))
    assert [f"{cls.__module__}:{cls.__qualname__}" for cls in loaded] == FQCNS


@pytest.mark.parametrize("fqcn", FQCNS)
def test_processor_implements_the_interface(fqcn: str) -> None:
    (cls,) = lp._load_custom_logitsprocs((fqcn,))
    assert issubclass(cls, lp.LogitsProcessor) and not inspect.isabstract(cls)
    # The engine calls these positionally or by these names; a renamed or extra required parameter breaks it.
    for name in ("__init__", "apply", "is_argmax_invariant", "update_state", "validate_params"):
        theirs = inspect.signature(getattr(lp.LogitsProcessor, name))
        ours = inspect.signature(getattr(cls, name))
        assert list(ours.parameters) == list(theirs.parameters), f"{cls.__name__}.{name}: {ours} vs {theirs}"


def test_batch_update_has_the_fields_the_harness_builds() -> None:
    update = lp.BatchUpdate(batch_size=2, removed=[1], added=[(0, SamplingParams(), [1], [])], moved=[])
    assert (update.batch_size, update.removed, update.moved) == (2, [1], [])
    assert {m.name for m in lp.MoveDirectionality} >= {"SWAP", "UNIDIRECTIONAL"}
