"""`governor adapters merge` against the real engine: the merged model served with LoRA off answers
like base + adapter served with LoRA on, and unlike the base; a killed merge leaves no output."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Live, start_governor, wait_for
from tests.integration.adapters import random_adapter
from tests.integration.placed import Placed, model_ids, unique

pytestmark = pytest.mark.engine

PROMPTS = [
    "The capital of France is", "Write a haiku about autumn.", "def fibonacci(n):", "Once upon a time, a fox",
    "The three primary colors are", "Explain photosynthesis in one sentence.", "List four kinds of trees:",
    "My favourite breakfast is", "The best way to learn a language is", "In 1969, astronauts",
    "Water boils at", "A recipe for pancakes starts with", "The moon orbits", "Translate 'good morning' to Spanish:",
    "Dear team, I am writing to", "The stock market today", "Rules of chess: the king", "import numpy as np\n",
    "A short poem about the sea:", "Three tips for better sleep:",
]  # fmt: skip
MERGE = [sys.executable, "-m", "governor", "adapters", "merge"]


def completions(url: str, model: str) -> list[str]:
    def one(prompt: str) -> str:
        body = {"model": model, "prompt": prompt, "max_tokens": 64, "temperature": 0, "decoding_preset": "off"}
        reply = httpx.post(url + "/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["text"])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, PROMPTS))


def killed_merge(adapter: Path, out: Path) -> None:
    """Start a merge and SIGKILL it once it is merging: the output folder must not exist."""
    proc = subprocess.Popen([*MERGE, str(adapter), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        if "writing the merged model" in line or time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait(30)
    assert not out.exists()


def test_merged_model_answers_like_lora_serving(live: Live, tmp_path: Path, placed: Placed) -> None:
    adapter = random_adapter(tmp_path / "src" / "merge-me", seed=41)
    out = tmp_path / "merged"
    killed_merge(adapter, out)
    done = subprocess.run([*MERGE, str(adapter), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".merged.merging-*")), "the killed merge's work folder is cleaned up"

    served = placed.drop(adapter, unique("merge-me"))
    wait_for(lambda: served in model_ids(live), 60, what="the adapter to be served")
    with_lora = completions(live.v1, served)
    base = completions(live.v1, live.model)

    (tmp_path / "merged-serve").mkdir()
    with start_governor(tmp_path / "merged-serve", GOVERNOR_MODEL=str(out), GOVERNOR_LORA="false") as merged_gw:
        cards = httpx.get(merged_gw.v1 + "/models", timeout=10).json()["data"]
        provenance = cards[0].get("governor_merge") or {}
        assert provenance.get("adapter") == "merge-me" and len(provenance.get("adapter_sha256", "")) == 64
        merged = completions(merged_gw.v1, cards[0]["id"])

    same_as_lora = sum(a == b for a, b in zip(merged, with_lora, strict=True))
    differ_from_base = sum(a != b for a, b in zip(merged, base, strict=True))
    assert same_as_lora >= 18, list(zip(merged, with_lora, strict=True))
    assert differ_from_base >= 15, "the adapter must change the model for this test to mean anything"
