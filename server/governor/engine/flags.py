"""Command line and environment for a local vLLM engine, per device profile."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from governor.engine.vllm_fixes import FIXES_ENV
from governor.settings import Settings

# One processor for DRY, the n-gram ban and the windowed penalty: one history, one step (issue 26).
PROCESSORS = ["governor.processors.governor:GovernorLogitsProcessor"]
# The same three controls as separate processors, in the order the Governor processor applies them:
# the reference the benchmarks and equivalence tests compare it with.
SEPARATE_PROCESSORS = [
    "governor.processors.dry:DRYLogitsProcessor",
    "governor.processors.ngram:NoRepeatNGramLogitsProcessor",
    "governor.processors.window_penalty:WindowedRepetitionPenaltyLogitsProcessor",
]
# vLLM accepts only these ranks for --max-lora-rank.
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def detect_device(setting: str) -> str:
    """'gpu' when asked, or on auto when nvidia-smi lists a GPU; else 'cpu'."""
    if setting != "auto":
        return setting
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "cpu"
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "gpu" if done.returncode == 0 and b"GPU" in done.stdout else "cpu"


def lora_rank_flag(max_rank: int) -> int:
    """Smallest rank vLLM accepts that holds max_rank."""
    return next((r for r in _LORA_RANKS if r >= max_rank), _LORA_RANKS[-1])


def engine_command(
    settings: Settings,
    model: str,
    served_name: str,
    port: int,
    device: str,
    uds: Path | None = None,
    memory_utilization: float | None = None,
) -> list[str]:
    """vLLM's command line: on the Unix socket `uds` when given, else on loopback `port`.

    No secret ever goes here (the command line is readable by every user in /proc): the engine's key
    travels in its environment (VLLM_API_KEY)."""
    listen = ["--uds", str(uds)] if uds else ["--host", "127.0.0.1", "--port", str(port)]
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", served_name,
        *listen,
        "--max-model-len", str(settings.max_model_len),
        "--disable-uvicorn-access-log",
        "--logits-processors", *PROCESSORS,
    ]  # fmt: skip
    if device == "cpu":
        # bf16 falls back to a slow matmul on CPUs without AMX: float32 is ~2.5x faster there.
        cmd += ["--dtype", "float32"]
    else:
        cmd += ["--gpu-memory-utilization", str(memory_utilization or settings.gpu_memory_utilization)]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    if settings.lora:
        cmd += [
            "--enable-lora",
            "--max-loras", str(settings.max_loras),
            "--max-cpu-loras", str(settings.engine_adapter_slots),
            "--max-lora-rank", str(lora_rank_flag(settings.max_lora_rank)),
        ]  # fmt: skip
    cmd += shlex.split(settings.engine_args)
    return cmd


def engine_env(settings: Settings, device: str, cuda_visible: str | None = None) -> dict[str, str]:
    """The child's environment: the operator's, plus what vLLM needs for Governor's features.

    Governor's own settings (API and admin keys among them) stay out: the engine needs none of them.
    An inherited VLLM_API_KEY goes too; the engine's key is Governor's to set (VllmProcess)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVERNOR_") and k != "VLLM_API_KEY"}
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # adapters are loaded at runtime by the registry
    env[FIXES_ENV] = "1"  # Governor's vLLM plugin applies its fixes in this engine (engine/vllm_fixes.py)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kv_cache_gib)
        # The default reserves a core for the frontend: on small machines that halves throughput.
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    else:
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    # Model Runner V2 (default on CUDA with Triton in recent vLLM) refuses v1-interface logits
    # processors at startup; Governor's processors use the v1 interface shared by 0.25 and 0.32.
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return env
