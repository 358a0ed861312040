"""`governor bench processors`: what the anti-loop logits processors cost the engine.

Two engines on the embedded model, one started with Governor's processors, one without, taking
turns (interleaved, same prompts, 128 in / 128 out):
  - all processors active on every request (the `strict` preset's engine args) vs plain requests,
    both on the engine with processors;
  - processors loaded but unused vs an engine without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from governor.bench.gateway import PROMPT, Pair, _wait_ready
from governor.bench.load import run_load
from governor.bench.processes import spawned
from governor.bootstrap import build_policy, resolve_model
from governor.engine.flags import PROCESSORS, engine_command, engine_env
from governor.engine.process import free_port
from governor.settings import Settings


def active_xargs(settings: Settings, model_dir: Path | None) -> dict[str, object]:
    """The engine arguments the `strict` preset sends: DRY + no-repeat n-gram + windowed penalty."""
    policy = build_policy(settings, model_dir)
    body = policy.build({"model": "m", "prompt": "x", "decoding_preset": "strict"}, kind="completions").body
    return dict(body["vllm_xargs"])


@contextlib.contextmanager
def _engine(settings: Settings, model: str, name: str, port: int, processors: bool, log: Path) -> Iterator[str]:
    cmd = engine_command(settings, model, name, port, "cpu")
    if not processors:
        start = cmd.index("--logits-processors")
        del cmd[start : start + 1 + len(PROCESSORS)]
    with spawned(cmd, env=engine_env(settings, "cpu"), log=log):
        yield f"http://127.0.0.1:{port}"


async def _pairs(with_url: str, plain_url: str, name: str, xargs: dict[str, object], concurrency: int, reps: int,
                 waves: int) -> list[str]:  # fmt: skip
    body = {"model": name, "prompt": PROMPT, "max_tokens": 128, "ignore_eos": True, "temperature": 0}
    total = waves * concurrency
    await run_load(with_url, body, concurrency, concurrency)
    await run_load(plain_url, body, concurrency, concurrency)
    active = Pair(f"all processors active vs plain request (same engine), concurrency {concurrency}", [], [])
    loaded = Pair(f"processors loaded, unused vs engine without them, concurrency {concurrency}", [], [])
    for _ in range(reps):
        # direct = the baseline, gateway = the measured side (Pair's naming)
        active.direct.append(await run_load(with_url, body, concurrency, total))
        active.gateway.append(await run_load(with_url, {**body, "vllm_xargs": xargs}, concurrency, total))
        loaded.direct.append(await run_load(plain_url, body, concurrency, total))
        loaded.gateway.append(await run_load(with_url, body, concurrency, total))
    return [active.report("tokens_per_second", "tok/s"), loaded.report("tokens_per_second", "tok/s")]


def run(settings: Settings, concurrencies: list[int], reps: int, waves: int) -> Iterator[str]:
    model, name, model_dir = resolve_model(settings)
    xargs = active_xargs(settings, model_dir)
    shown = {k: (f"[{len(v)} ids]" if isinstance(v, list) else v) for k, v in xargs.items()}
    yield f"active engine args: {shown}"
    logs = Path(tempfile.mkdtemp(prefix="governor-bench-"))
    with (
        _engine(settings, model, name, free_port(), True, logs / "with.log") as with_url,
        _engine(settings, model, name, free_port(), False, logs / "plain.log") as plain_url,
    ):
        asyncio.run(_wait_ready(with_url + "/health", settings.engine_start_timeout))
        asyncio.run(_wait_ready(plain_url + "/health", settings.engine_start_timeout))
        for c in concurrencies:
            yield from asyncio.run(_pairs(with_url, plain_url, name, xargs, c, reps, waves))
