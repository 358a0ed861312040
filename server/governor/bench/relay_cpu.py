"""`governor bench gateway --cpu`: the gateway's CPU per relayed event on a real engine, against the
engine's own API server on the same events.

A vLLM engine (the embedded model unless GOVERNOR_MODEL names another) and Governor in remote mode in
front of it, each under the bench's watchdog. Every run reads both processes' time on a CPU (the
scheduler's exact count, bench/wakeup.py) and the gateway's wake-ups (voluntary context switches) before
and after; their idle background (health probes, metric polls) is measured over an idle window first and
subtracted, and printed on its own. What a bare wake-up costs on this machine is measured too: a process
woken once per event pays it before any work of its own. Runs go direct and through
the gateway in alternating order (ABBA), so TTFT and inter-token gaps have a baseline in the same run.
`--profile` samples the gateway with py-spy during one more run and sorts its time by what it was doing
(bench/relay_profile.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from governor.bench.gateway import PROMPT, _wait_ready
from governor.bench.load import LoadResult, run_load
from governor.bench.processes import spawned
from governor.bench.wakeup import on_cpu_seconds, wakeup_cost
from governor.engine.flags import engine_command, engine_env
from governor.engine.process import free_port
from governor.runtime.bootstrap import resolve_model
from governor.settings import Settings

IDLE_SECONDS = 10.0


def cpu_seconds(proc: psutil.Process) -> float:
    return on_cpu_seconds(proc.pid)


def wakeups(proc: psutil.Process) -> int:
    return int(proc.num_ctx_switches().voluntary)


def child(watchdog: psutil.Process, marker: str) -> psutil.Process:
    """The process under a watchdog whose command line contains `marker` (not a watchdog naming it)."""
    for proc in watchdog.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.cmdline())
            if marker in cmdline and "governor.engine.watchdog" not in cmdline:
                return proc
    raise LookupError(f"no process with {marker!r} under {watchdog.pid}")


@dataclass
class Run:
    """One load run: its result and both sides' CPU seconds over it (the gateway's: all its processes)."""

    load: LoadResult
    gateway_cpu: float
    server_cpu: float
    gateway_wakeups: int
    shares: list[float] = field(default_factory=list)  # each gateway process's CPU seconds, the owner's first


@dataclass
class Side:
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r.load, attr) for r in self.runs)


@dataclass
class Meter:
    gateway: psutil.Process
    server: psutil.Process
    gateway_idle: float = 0.0  # CPU seconds per wall second, doing nothing
    server_idle: float = 0.0
    relays: list[psutil.Process] = field(default_factory=list)  # the gateway's relay workers, counted with it

    def _gateway(self) -> list[float]:
        return [cpu_seconds(p) for p in (self.gateway, *self.relays)]

    def _wakeups(self) -> int:
        return sum(wakeups(p) for p in (self.gateway, *self.relays))

    async def idle(self, seconds: float) -> None:
        g, s = sum(self._gateway()), cpu_seconds(self.server)
        await asyncio.sleep(seconds)
        self.gateway_idle = (sum(self._gateway()) - g) / seconds
        self.server_idle = (cpu_seconds(self.server) - s) / seconds

    async def run(self, url: str, body: dict[str, object], concurrency: int, total: int) -> Run:
        g, s, w = self._gateway(), cpu_seconds(self.server), self._wakeups()
        load = await run_load(url, body, concurrency, total)
        shares = [after - before for after, before in zip(self._gateway(), g, strict=True)]
        return Run(load, sum(shares), cpu_seconds(self.server) - s, self._wakeups() - w, shares)

    def per_event(self, run: Run) -> tuple[float, float, float]:
        """µs per event: the gateway's net of its idle background, the server's net of its own, and the
        gateway's idle background on its own."""
        events = max(1, run.load.events)
        idle_gw = self.gateway_idle * run.load.seconds
        gateway = (run.gateway_cpu - idle_gw) / events * 1e6
        server = (run.server_cpu - self.server_idle * run.load.seconds) / events * 1e6
        return gateway, server, idle_gw / events * 1e6

    @staticmethod
    def gross(run: Run) -> tuple[float, float]:
        """µs per event with nothing subtracted: gateway, server. Background that stops under load (health
        checks answered by the traffic itself) makes the net figure subtract too much; this one never does."""
        events = max(1, run.load.events)
        return run.gateway_cpu / events * 1e6, run.server_cpu / events * 1e6


def _spread(values: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(meter: Meter, label: str, direct: Side, gateway: Side) -> str:
    costs = [meter.per_event(r) for r in gateway.runs]
    gw, srv, idle = ([c[i] for c in costs] for i in range(3))
    ratios = [g / s for g, s, _ in costs]
    woken = [r.gateway_wakeups / max(1, r.load.events) for r in gateway.runs]
    gross = [meter.gross(r) for r in gateway.runs]
    gross_ratios = [g / s for g, s in gross]
    errors = sum(r.load.errors for r in direct.runs + gateway.runs)
    return (
        f"{label}: gateway {_spread(gw)} µs/event (idle background {_spread(idle)} µs/event, subtracted), "
        f"woken {_spread(woken, '.2f')} times per event; API server {_spread(srv)} µs/event; "
        f"ratio median {_spread(ratios, '.3f')}, n={len(ratios)}; gross (nothing subtracted): gateway "
        f"{_spread([g for g, _ in gross])}, API server {_spread([s for _, s in gross])} µs/event, "
        f"ratio {_spread(gross_ratios, '.3f')}; "
        f"{_latency(direct, gateway)}; errors {errors}"
    )


def _latency(direct: Side, gateway: Side) -> str:
    ms = 1000.0
    ttft, gap = gateway.median("ttft_p50") * ms, gateway.median("gap_p50") * ms
    if not direct.runs:
        return f"TTFT p50 gateway {ttft:.1f} ms; inter-token p50 gateway {gap:.2f} ms (no direct side: local mode)"
    d_ttft, d_gap = direct.median("ttft_p50") * ms, direct.median("gap_p50") * ms
    return (f"TTFT p50 gateway {ttft:.1f} ms (direct {d_ttft:.1f}, {ttft - d_ttft:+.2f}); "
            f"inter-token p50 gateway {gap:.2f} ms (direct {d_gap:.2f}, {gap - d_gap:+.2f})")  # fmt: skip


async def compare(meter: Meter, engine_url: str | None, gateway_url: str, model: str, preset: str, concurrency: int,
                  tokens: int, reps: int, waves: int) -> tuple[Side, Side]:  # fmt: skip
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    through = {**body, "decoding_preset": preset}
    direct, gateway = Side(), Side()
    total = waves * concurrency
    await run_load(gateway_url, through, concurrency, max(2, concurrency // 4))  # warm both paths
    for rep in range(reps):
        for side in ("direct", "gateway") if rep % 2 == 0 else ("gateway", "direct"):
            if side == "direct":
                if engine_url is not None:  # local mode: the engine is on Governor's private socket
                    direct.runs.append(await meter.run(engine_url, body, concurrency, total))
            else:
                gateway.runs.append(await meter.run(gateway_url, through, concurrency, total))
    return direct, gateway


def gateway_env(port: int, model: str, name: str, engine_url: str | None, **extra: str) -> dict[str, str]:
    """A bench Governor's environment: base model only, no adapter watching, quiet; remote when `engine_url`."""
    env = {**os.environ, "GOVERNOR_PORT": str(port), "GOVERNOR_MODEL": model, "GOVERNOR_SERVED_MODEL_NAME": name,
           "GOVERNOR_LORA": "false", "GOVERNOR_WATCH_ADAPTERS": "false", "GOVERNOR_LOG_LEVEL": "warning",
           **extra}  # fmt: skip
    if engine_url is not None:
        env["GOVERNOR_ENGINE_URL"] = engine_url
    return env


def run(settings: Settings, concurrencies: list[int], presets: list[str], tokens: int, reps: int, waves: int,
        profile: bool, local: bool = False) -> Iterator[str]:  # fmt: skip
    """`local`: Governor starts the engine itself, on its private Unix socket (as `make serve` does); there
    is no direct side then, only the two processes' CPU."""
    model, name, model_dir = resolve_model(settings)
    logs = Path(tempfile.mkdtemp(prefix="governor-relay-cpu-"))
    engine_port, gw_port = free_port(), free_port()
    engine_url: str | None = None if local else f"http://127.0.0.1:{engine_port}"
    gw_url = f"http://127.0.0.1:{gw_port}"
    gw_env = gateway_env(gw_port, str(model_dir or model), name, engine_url)
    yield f"engine and gateway logs in {logs}"
    with contextlib.ExitStack() as stack:
        if engine_url is not None:
            engine = stack.enter_context(spawned(engine_command(settings, model, name, engine_port, "cpu"),
                                                 env=engine_env(settings, "cpu"), log=logs / "engine.log"))  # fmt: skip
            asyncio.run(_wait_ready(engine_url + "/health", settings.engine_start_timeout))
        gw = stack.enter_context(spawned([sys.executable, "-m", "governor", "serve"], env=gw_env,
                                         log=logs / "gateway.log"))  # fmt: skip
        asyncio.run(_wait_ready(gw_url + "/ready", settings.engine_start_timeout + 60))
        under = gw if engine_url is None else engine
        meter = Meter(child(psutil.Process(gw.pid), "governor serve"),
                      child(psutil.Process(under.pid), "vllm.entrypoints.openai.api_server"))  # fmt: skip
        asyncio.run(run_load(engine_url or gw_url, {"model": name, "prompt": PROMPT, "max_tokens": 16}, 4, 8))
        asyncio.run(meter.idle(IDLE_SECONDS))
        floor = ", ".join(f"{wakeup_cost(gap):.1f} µs every {gap * 1000:g} ms" for gap in (0.0005, 0.005))
        yield f"a bare wake-up on this machine (no work): {floor}"
        yield (f"idle background: gateway {meter.gateway_idle * 1000:.1f} ms CPU/s, "
               f"API server {meter.server_idle * 1000:.1f} ms CPU/s (over {IDLE_SECONDS:.0f} s)")  # fmt: skip
        for concurrency in concurrencies:
            for preset in presets:
                direct, gateway = asyncio.run(
                    compare(meter, engine_url, gw_url, name, preset, concurrency, tokens, reps, waves)
                )
                label = f"{preset}, {concurrency} streams x {tokens} tokens"
                yield report(meter, label, direct, gateway)
                if profile:
                    from governor.bench.relay_profile import profile_run

                    yield from profile_run(meter, gw_url, name, preset, concurrency, tokens, logs, time.time())
