"""The status view's data: engines, adapters, the gateway's own counters and the GPUs, as one JSON-ready dict.

Read from what the gateway already holds (engine objects, the adapter registry, its metric families, the
NVML collector's last reading), so a refresh costs no engine round trip except each engine's `/version`,
asked once per engine start (all engines at once, briefly; an answer or its failure kept until the engine
restarts). Nothing in it names a server path: adapter failure reasons are redacted as /v1 errors are, and
the admin API's `path` is left out. Per-adapter usage (requests, last use, failure reason) is for the admin
key only: any user key may read the rest, as it could /metrics.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from governor.engine.base import EngineClient, EngineState
from governor.engine.pool import EnginePool
from governor.engine.process import VllmProcess
from governor.errors import EngineUnavailable
from governor.lora.registry import AdapterRegistry
from governor.metrics.gateway import GatewayMetrics
from governor.metrics.gpu import GpuCollector
from governor.redaction import redact_paths
from governor.settings import Settings

# NVML readings shown on the page: the page's key for each reading's key.
GPU_VALUES = {"utilization": "utilization", "memory_used": "memory_used_bytes", "memory_total": "memory_total_bytes"}
# A hung engine's /version must not hold up the poll; a live one answers in milliseconds.
VERSION_TIMEOUT_S = 0.5
# The runner switch Governor sets for the engines it starts (engine/flags.py).
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
ADAPTER_FIELDS = ("name", "state", "tier", "pinned", "in_flight", "waiting", "version", "source")


class StatusReader:
    """Builds the status snapshot; keeps each engine's version (asked again when the engine restarts)."""

    def __init__(
        self,
        settings: Settings,
        pool: EnginePool,
        registry: AdapterRegistry | None,
        metrics: GatewayMetrics,
        gpu: GpuCollector,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._registry = registry
        self._metrics = metrics
        self._gpu = gpu
        # engine name -> (generation asked at, version or None when it did not say): asked once per start
        self._versions: dict[str, tuple[int, str | None]] = {}

    async def snapshot(self, *, admin: bool = False) -> dict[str, Any]:
        """Everything the status view shows, read now; per-adapter usage only for the admin."""
        m = self._metrics
        requests = _sum_by_model(m.requests.series())
        engines = self._pool.engines
        versions = await asyncio.gather(*(self._version(e) for e in engines))
        return {
            "time": time.time(),
            "model": self._pool.served_model,
            "engines": [self._engine(e, v) for e, v in zip(engines, versions, strict=True)],
            "lora": self._settings.lora,
            "adapters": self._adapters(requests, admin),
            "gateway": {
                "requests_total": sum(requests.values()),
                "in_flight": m.in_flight.value,
                "running": m.flights.running,
                "waiting": m.flights.waiting,
                "prompt_tokens_total": _total(m.prompt_tokens.series()),
                "output_tokens_total": _total(m.output_tokens.series()),
                "loops_cut_total": _total(m.loops_cut.series()),
            },
            "gpus": self._gpus(),
        }

    def _engine(self, engine: EngineClient, version: str | None) -> dict[str, Any]:
        return {
            "name": engine.name,
            "state": engine.state.value,
            "kind": "local" if isinstance(engine, VllmProcess) else "remote",
            "restarts": engine.restarts if isinstance(engine, VllmProcess) else 0,
            "outstanding": engine.outstanding,
            "version": version,
            "runner": _runner(engine),
        }

    async def _version(self, engine: EngineClient) -> str | None:
        known = self._versions.get(engine.name)
        if known is not None and known[0] == engine.generation:
            return known[1]
        if engine.state != EngineState.READY:
            return known[1] if known else None
        version = None
        try:
            status, body = await asyncio.wait_for(
                engine.request_json("GET", "/version", timeout=VERSION_TIMEOUT_S), VERSION_TIMEOUT_S
            )
        except (EngineUnavailable, TimeoutError):
            pass
        else:
            if status == 200 and isinstance(body, dict) and isinstance(body.get("version"), str):
                version = body["version"]
        # A failure is kept too: an engine without /version (or hung) is not asked again every poll.
        self._versions[engine.name] = (engine.generation, version)
        return version

    def _adapters(self, requests: dict[str, float], admin: bool) -> list[dict[str, Any]]:
        if self._registry is None or not self._settings.lora:
            return []
        out = []
        for described in self._registry.list():
            row = {k: described.get(k) for k in ADAPTER_FIELDS}
            if admin:  # who uses which adapter, and how, is the operator's to see
                row["last_used"] = described.get("last_used")
                row["reason"] = redact_paths(described["reason"]) if described.get("reason") else None
                row["requests"] = requests.get(described["name"], 0.0)
            out.append(row)
        return out

    def _gpus(self) -> list[dict[str, Any]]:
        """One row per GPU NVML reads and finds up; empty without NVML (a CPU machine)."""
        rows = []
        for reading in self._gpu.readings_up():
            row: dict[str, Any] = {"index": str(reading.gpu.index), "name": reading.gpu.name}
            row.update({page: reading.values[key] for key, page in GPU_VALUES.items() if key in reading.values})
            rows.append(row)
        return rows


def _runner(engine: EngineClient) -> str | None:
    """Which vLLM model runner an engine Governor started uses; unknown (None) for a remote engine."""
    if not isinstance(engine, VllmProcess):
        return None
    return "v2" if engine.env.get(RUNNER_ENV) == "1" else "v1"


def _total(series: Any) -> float:
    return float(sum(value.value for _, value in series))


def _sum_by_model(series: Any) -> dict[str, float]:
    """Finished requests per model label (the first label of `governor_requests`), every status summed."""
    out: dict[str, float] = {}
    for labels, value in series:
        out[labels[0]] = out.get(labels[0], 0.0) + value.value
    return out
