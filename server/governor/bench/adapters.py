"""`governor bench adapters`: many adapters through Governor vs vLLM called directly, interleaved.

Two engines on this machine with the same flags (`--max-loras`, `--max-cpu-loras` from the settings):
vLLM direct, started with every adapter given at start (`--lora-modules`), and Governor serving the same
adapter folders dropped in its adapters root (registered; loaded and evicted on demand). Three mixes of
the same request count: 4 hot adapters, all of them round-robin, and a Zipf(1) mix over all of them (one
fixed sequence for both sides). The adapters are made here with peft (random non-zero weights), so the
run needs nothing but the base model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from governor.bench.gateway import PROMPT, Pair, _wait_ready, interleaved
from governor.bench.load import LoadResult
from governor.bench.processes import spawned
from governor.engine.flags import detect_device, engine_command, engine_env
from governor.engine.process import free_port
from governor.runtime.bootstrap import resolve_model
from governor.settings import Settings

RANK = 16
TARGETS = ["q_proj", "v_proj"]


def make_adapters(base_dir: Path, root: Path, count: int) -> list[Path]:
    """`count` rank-16 LoRAs of the base with random non-zero weights (peft), one folder each under root."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    folders = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        folders.append(root / f"a-{i}")
        peft_model.save_pretrained(str(folders[-1]))
        model = peft_model.unload()
    return folders


MIXES = ("hot", "round-robin", "zipf")


def mixes(count: int, total: int, seed: int = 7) -> dict[str, tuple[str, list[str]]]:
    """Per-request adapter names for each mix, by its short name; the Zipf sequence is drawn once, so both
    sides get it."""
    names = [f"a-{i}" for i in range(count)]
    rng = random.Random(seed)
    zipf = rng.choices(names, [1 / (k + 1) for k in range(count)], k=total)
    return {"hot": ("4 hot", names[:4]), "round-robin": (f"{count} round-robin", names),
            "zipf": (f"{count} zipf", zipf)}  # fmt: skip


async def _wait_filled(url: str, loaded: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/v1/models") as resp:
                states = [m.get("state") for m in (await resp.json())["data"]]
            if states.count("ready") >= loaded:
                return
            await asyncio.sleep(1)
    raise TimeoutError(f"{loaded} adapters not loaded after {timeout:.0f} s")


def _p(results: list[LoadResult], attr: str) -> float:
    return statistics.median(getattr(x, attr) for x in results) * 1000


def report(pair: Pair) -> str:
    ratios = pair.ratios("tokens_per_second")
    direct = statistics.median(x.tokens_per_second for x in pair.direct)
    gateway = statistics.median(x.tokens_per_second for x in pair.gateway)
    errors = sum(x.errors for x in pair.direct + pair.gateway)
    return (
        f"{pair.label}: direct {direct:,.1f} tok/s, Governor {gateway:,.1f} tok/s; Governor/direct median "
        f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, n={len(ratios)}); "
        f"TTFT p50 direct {_p(pair.direct, 'ttft_p50'):.0f} ms, Governor {_p(pair.gateway, 'ttft_p50'):.0f} ms; "
        f"TTFT p99 direct {_p(pair.direct, 'ttft_p99'):.0f} ms, Governor {_p(pair.gateway, 'ttft_p99'):.0f} ms; "
        f"errors {errors}"
    )


def run(settings: Settings, count: int, concurrency: int, total: int, reps: int, max_tokens: int,
        only: tuple[str, ...] | list[str] = MIXES) -> Iterator[str]:  # fmt: skip
    unknown = set(only) - set(MIXES)
    if unknown:
        raise SystemExit(f"unknown mix {', '.join(sorted(unknown))}; choose from {', '.join(MIXES)}")
    model, name, base_dir = resolve_model(settings)
    if base_dir is None:
        raise SystemExit(f"the base model {model!r} has no local files to make adapters from")
    device = detect_device(settings.device)
    work = Path(tempfile.mkdtemp(prefix="governor-bench-adapters-"))
    folders = make_adapters(base_dir, work / "adapters", count)
    lora = settings.model_copy(update={"lora": True, "max_lora_rank": RANK})
    yield (f"device {device}; {count} adapters rank {RANK} on {', '.join(TARGETS)}; --max-loras {lora.max_loras} "
           f"--max-cpu-loras {lora.engine_adapter_slots}; {total} requests a run at concurrency {concurrency}, "
           f"max_tokens {max_tokens}; logs in {work}")  # fmt: skip
    direct_port, gw_port = free_port(), free_port()
    memory = settings.gpu_memory_utilization / 2  # two engines on one GPU
    direct_cmd = engine_command(lora, model, name, direct_port, device, memory_utilization=memory)
    direct_cmd += ["--lora-modules", *(f"{f.name}={f}" for f in folders)]
    gw_env = {
        **os.environ, "GOVERNOR_PORT": str(gw_port), "GOVERNOR_ADAPTERS_DIR": str(work / "adapters"),
        "GOVERNOR_STATE_DIR": str(work / "state"), "GOVERNOR_MAX_LORA_RANK": str(RANK),
        "GOVERNOR_MAX_LORAS": str(lora.max_loras), "GOVERNOR_MAX_CPU_LORAS": str(lora.engine_adapter_slots),
        "GOVERNOR_ENFORCE_EAGER": str(settings.enforce_eager).lower(), "GOVERNOR_ADDRESS_CONCURRENCY": "0",
        "GOVERNOR_GPU_MEMORY_UTILIZATION": str(memory), "GOVERNOR_LOG_LEVEL": "warning",
    }  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(spawned(direct_cmd, env=engine_env(settings, device), log=work / "direct.log"))
        # One at a time: on a GPU each checks free memory against its share as it starts.
        asyncio.run(_wait_ready(f"http://127.0.0.1:{direct_port}/health", settings.engine_start_timeout))
        stack.enter_context(spawned([sys.executable, "-m", "governor", "serve"], env=gw_env, log=work / "gov.log"))
        asyncio.run(_wait_ready(f"http://127.0.0.1:{gw_port}/ready", settings.engine_start_timeout))
        # Governor fills the engine's slots from the registered folders after a start: not timed.
        asyncio.run(_wait_filled(f"http://127.0.0.1:{gw_port}", min(count, lora.engine_adapter_slots)))
        body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        for label, models in [mix for key, mix in mixes(count, total).items() if key in only]:
            pair = asyncio.run(interleaved(f"http://127.0.0.1:{direct_port}", f"http://127.0.0.1:{gw_port}", body,
                                           concurrency, total, reps, label, {"decoding_preset": "off"},
                                           models=models))  # fmt: skip
            yield report(pair)
