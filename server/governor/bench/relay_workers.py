"""`governor bench gateway --cpu --relay-workers N`: the gateway as one process against N relaying processes
(the owner and N - 1 relay workers), on one real engine, in the same run.

vLLM's CPU engine (the embedded model unless GOVERNOR_MODEL names another) and two Governors in remote mode
in front of it: one with ``GOVERNOR_RELAY_WORKERS=1``, one with N. Load runs go through each in alternating
order (ABBA); each run reads the CPU time of every gateway process and of vLLM's API server (the scheduler's
count, bench/wakeup.py). Printed per side, median (min-max) of the reps: the gateway's CPU per relayed event
(all its processes, nothing subtracted) and its ratio to the API server's, wake-ups per event, TTFT and
inter-token p50; for the N-process side each process's share of the gateway's CPU (how evenly the kernel
spread the connections); and per rep pair the N-process gateway's CPU per event over the one-process one's.
On a machine whose cores the engine and the load client already use, this shows the spread and what a second
process costs per event, not more capacity (that needs free cores: see docs/operating.md)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

from governor.bench.gateway import PROMPT, _wait_ready
from governor.bench.load import run_load
from governor.bench.processes import spawned
from governor.bench.relay_cpu import Meter, Run, Side, _spread, child, gateway_env
from governor.engine.flags import engine_command, engine_env
from governor.engine.process import free_port
from governor.runtime.bootstrap import resolve_model
from governor.settings import Settings

WORKER_MARKER = "governor.runtime.relay_worker"


def relay_children(owner: psutil.Process) -> list[psutil.Process]:
    return [p for p in owner.children() if WORKER_MARKER in " ".join(p.cmdline())]


def side_line(label: str, side: Side) -> str:
    gross = [r.gateway_cpu / max(1, r.load.events) * 1e6 for r in side.runs]
    server = [r.server_cpu / max(1, r.load.events) * 1e6 for r in side.runs]
    woken = [r.gateway_wakeups / max(1, r.load.events) for r in side.runs]
    ratio = [g / s for g, s in zip(gross, server, strict=True)]
    errors = sum(r.load.errors for r in side.runs)
    line = (f"{label}: gateway {_spread(gross)} µs/event (all its processes), API server {_spread(server)}, "
            f"ratio {_spread(ratio, '.3f')}; woken {_spread(woken, '.2f')} times per event; TTFT p50 "
            f"{side.median('ttft_p50') * 1000:.1f} ms, inter-token p50 {side.median('gap_p50') * 1000:.2f} ms; "
            f"errors {errors}; n={len(side.runs)}")  # fmt: skip
    processes = len(side.runs[0].shares) if side.runs else 0
    if processes > 1:
        shares = [[r.shares[i] / max(1e-9, r.gateway_cpu) for r in side.runs] for i in range(processes)]
        line += "; CPU share per process (owner first): " + ", ".join(_spread(s, ".2f") for s in shares)
    return line


def pair_line(one: Side, several: Side) -> str:
    ratios = [
        (b.gateway_cpu / max(1, b.load.events)) / (a.gateway_cpu / max(1, a.load.events))
        for a, b in zip(one.runs, several.runs, strict=True)
    ]
    return f"gateway CPU per event, several processes / one, per rep pair: {_spread(ratios, '.3f')}"


async def compare(meters: dict[str, Meter], urls: dict[str, str], model: str, preset: str, concurrency: int,
                  tokens: int, reps: int, waves: int) -> dict[str, Side]:  # fmt: skip
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "decoding_preset": preset}  # fmt: skip
    sides = {name: Side() for name in meters}
    for name in meters:
        await run_load(urls[name], body, concurrency, max(2, concurrency // 4))  # warm both
    names = list(meters)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            run: Run = await meters[name].run(urls[name], body, concurrency, waves * concurrency)
            sides[name].runs.append(run)
    return sides


def run(settings: Settings, concurrencies: list[int], presets: list[str], tokens: int, reps: int, waves: int,
        workers: int) -> Iterator[str]:  # fmt: skip
    model, name, model_dir = resolve_model(settings)
    logs = Path(tempfile.mkdtemp(prefix="governor-relay-workers-"))
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    ports = {"one": free_port(), "several": free_port()}
    urls = {side: f"http://127.0.0.1:{port}" for side, port in ports.items()}
    yield f"engine and gateway logs in {logs}"
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(spawned(engine_command(settings, model, name, engine_port, "cpu"),
                                             env=engine_env(settings, "cpu"), log=logs / "engine.log"))  # fmt: skip
        asyncio.run(_wait_ready(engine_url + "/health", settings.engine_start_timeout))
        server = child(psutil.Process(engine.pid), "vllm.entrypoints.openai.api_server")
        meters: dict[str, Meter] = {}
        for side, count in (("one", 1), ("several", workers)):
            env = gateway_env(ports[side], str(model_dir or model), name, engine_url,
                              GOVERNOR_RELAY_WORKERS=str(count))  # fmt: skip
            gw = stack.enter_context(spawned([sys.executable, "-m", "governor", "serve"], env=env,
                                             log=logs / f"gateway-{side}.log"))  # fmt: skip
            asyncio.run(_wait_ready(urls[side] + "/ready", 120))
            owner = child(psutil.Process(gw.pid), "governor serve")
            meters[side] = Meter(owner, server, relays=relay_children(owner))
        found = len(meters["several"].relays)
        if found != workers - 1:
            raise RuntimeError(f"expected {workers - 1} relay workers, found {found}")
        for concurrency in concurrencies:
            for preset in presets:
                sides = asyncio.run(compare(meters, urls, name, preset, concurrency, tokens, reps, waves))
                label = f"{preset}, {concurrency} streams x {tokens} tokens"
                yield side_line(f"{label}, 1 process", sides["one"])
                yield side_line(f"{label}, {workers} processes", sides["several"])
                yield pair_line(sides["one"], sides["several"])
