"""Which model runner can run Governor's processors on this vLLM: what ``engine/compat.py`` records.

Runs in both contract processes: on 0.25 the new runner's interface is absent and the adapter module
still imports; on 0.32 the adapter implements that interface and vLLM's own loader takes it. On the
CPU build without a Triton CPU backend, the recorded reason the new runner cannot serve is shown by
calling the vLLM code that raises it (the real engine start is ``tests/integration/test_runner_v2_cpu.py``).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from types import SimpleNamespace

import pytest

from governor.engine import compat
from governor.processors import runner_v2

INTERFACE = "vllm.v1.worker.gpu.sample.logits_processor.interface"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_interface_presence_is_read_without_importing_vllm() -> None:
    assert compat.runner_v2_interface_present() is _importable(INTERFACE)
    assert runner_v2.HAS_RUNNER_V2_INTERFACE is compat.runner_v2_interface_present()


def test_the_adapter_implements_the_new_runner_interface() -> None:
    if not compat.runner_v2_interface_present():
        pytest.skip("this vLLM has no new-runner processor interface (the adapter is never named to it)")
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    (cls,) = _load_v2_logitsprocs_by_fqcns([compat.RUNNER_V2_PROCESSOR])
    assert issubclass(cls, LogitsProcessor) and not inspect.isabstract(cls)
    for name in ("__init__", "validate_params", "add_request", "apply_staged_writes", "apply"):
        theirs = inspect.signature(getattr(LogitsProcessor, name))
        ours = inspect.signature(getattr(cls, name))
        assert list(ours.parameters) == list(theirs.parameters), f"{name}: {ours} vs {theirs}"


def test_the_recorded_cpu_finding_is_what_this_vllm_does() -> None:
    if not compat.runner_v2_interface_present():
        pytest.skip("this vLLM has no new runner")
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cpu() or HAS_TRITON:
        pytest.skip("the finding is for a CPU build without a Triton CPU backend")
    import torch
    from vllm.v1.worker.cpu.buffer_utils import UvaBuffer
    from vllm.v1.worker.gpu import buffer_utils

    (finding,) = [f for f in compat.RUNNER_V2_FINDINGS if f.device == "cpu"]
    assert not finding.serves and finding.error is not None
    # What the engine died with: vLLM's config refuses the new runner without Triton.
    from vllm.config import VllmConfig

    with pytest.raises(ValueError, match=re.escape(finding.error)):
        VllmConfig._validate_v2_model_runner(SimpleNamespace())  # type: ignore[arg-type]
    # What would fail next: the runner's token history made as the CPU worker makes it (its UvaBuffer
    # patched in), then the first staged write every request's arrival ends in.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(buffer_utils, "UvaBuffer", UvaBuffer)
        history = buffer_utils.StagedWriteTensor((2, 8), torch.int32, torch.device("cpu"), uva_instead_of_gpu=True)
    history.stage_write(0, 0, [1, 2, 3])
    with pytest.raises(TypeError, match="'function' object is not subscriptable"):
        history.apply_write()
    assert "'function' object is not subscriptable" in finding.where
