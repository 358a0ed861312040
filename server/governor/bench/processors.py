"""`governor bench processors`: what the anti-loop logits processors cost the engine.

Two engines on the embedded model, one started with Governor's processors, one without, on the
device Governor would pick (a GPU gets each engine half the memory share, and they start one after
the other: vLLM checks free memory against its share at start). Same prompt, 128 tokens out,
ignore_eos, greedy; each comparison interleaved in alternating order (ABBA), medians with spreads:
  - a preset's processor arguments on every request vs plain requests, on the engine with them;
  - processors loaded but unused vs an engine without them.
`--synthetic` times the processors directly instead (bench/processors_synthetic.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from governor.bench.gateway import PROMPT, _wait_ready, interleaved
from governor.bench.load import run_load
from governor.bench.processes import spawned
from governor.engine.flags import PROCESSORS, detect_device, engine_command, engine_env
from governor.engine.process import free_port
from governor.runtime.bootstrap import build_policy, resolve_model
from governor.settings import Settings

MEMORY_FLAG = "--gpu-memory-utilization"


def active_xargs(settings: Settings, model_dir: Path | None, preset: str = "strict") -> dict[str, object]:
    """The engine arguments a preset sends (`strict`: DRY + no-repeat n-gram + windowed penalty)."""
    policy = build_policy(settings, model_dir)
    body = policy.build({"model": "m", "prompt": "x", "decoding_preset": preset}, kind="completions").body
    return dict(body["vllm_xargs"])


def bench_command(settings: Settings, model: str, name: str, port: int, device: str, processors: bool,
                  engines: int) -> list[str]:  # fmt: skip
    """The engine command: without Governor's processors when asked; on a GPU shared by `engines`
    engines, each with 1/engines of the memory share."""
    cmd = engine_command(settings, model, name, port, device)
    if not processors:
        start = cmd.index("--logits-processors")
        del cmd[start : start + 1 + len(PROCESSORS)]
    if device != "cpu" and MEMORY_FLAG in cmd:
        at = cmd.index(MEMORY_FLAG) + 1
        cmd[at] = f"{settings.gpu_memory_utilization / engines:.3f}"
    return cmd


async def _compare(with_url: str, plain_url: str, name: str, presets: dict[str, dict[str, object]],
                   concurrency: int, reps: int, unused_reps: int, waves: int) -> list[str]:  # fmt: skip
    body = {"model": name, "prompt": PROMPT, "max_tokens": 128, "ignore_eos": True, "temperature": 0}
    total = waves * concurrency
    lines = []
    for preset, xargs in presets.items():
        # direct = the baseline, gateway = the measured side (Pair's naming)
        label = f"{preset} processors active / plain requests (same engine), concurrency {concurrency}"
        pair = await interleaved(with_url, with_url, body, concurrency, total, reps, label, {"vllm_xargs": xargs})
        lines.append(pair.report("tokens_per_second", "tok/s"))
    label = f"processors loaded, unused / engine without them, concurrency {concurrency}"
    pair = await interleaved(plain_url, with_url, body, concurrency, total, unused_reps, label, {})
    lines.append(pair.report("tokens_per_second", "tok/s"))
    await run_load(with_url, body, 1, 1)  # both engines still answer after the runs
    return lines


def run(settings: Settings, concurrencies: Sequence[int], reps: int, waves: int, presets: Sequence[str] = ("balanced",),
        unused_reps: int = 5) -> Iterator[str]:  # fmt: skip
    model, name, model_dir = resolve_model(settings)
    device = detect_device(settings.device)
    xargs = {preset: active_xargs(settings, model_dir, preset) for preset in presets}
    for preset, args in xargs.items():
        yield f"{preset} engine args: {args}"
    logs = Path(tempfile.mkdtemp(prefix="governor-bench-"))
    yield f"device {device}; engine logs in {logs}"
    env = engine_env(settings, device)
    with contextlib.ExitStack() as stack:
        urls = []
        for processors, log in ((True, "with.log"), (False, "plain.log")):
            port = free_port()
            cmd = bench_command(settings, model, name, port, device, processors, engines=2)
            stack.enter_context(spawned(cmd, env=env, log=logs / log))
            urls.append(f"http://127.0.0.1:{port}")
            if device != "cpu":  # one at a time on a shared GPU
                asyncio.run(_wait_ready(urls[-1] + "/health", settings.engine_start_timeout))
        for url in urls:
            asyncio.run(_wait_ready(url + "/health", settings.engine_start_timeout))
        for c in concurrencies:
            yield from asyncio.run(_compare(urls[0], urls[1], name, xargs, c, reps, unused_reps, waves))
