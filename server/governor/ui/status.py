"""The status view's data: engines, adapters, the gateway's own counters and the GPUs, as one JSON-ready dict.

Read from what the gateway already holds (engine objects, the adapter registry, its metric families, the
NVML collector's last reading through the metrics registry), so a refresh costs no engine round trip
except each engine's `/version`, asked once per engine start. Nothing in it names a server path: adapter
failure reasons are redacted as /v1 errors are, and the admin API's `path` is left out.
"""

from __future__ import annotations

import time
from typing import Any

from governor.engine.base import EngineClient, EngineState
from governor.engine.pool import EnginePool
from governor.engine.process import VllmProcess
from governor.errors import EngineUnavailable
from governor.lora.registry import AdapterRegistry
from governor.metrics.gateway import GatewayMetrics
from governor.redaction import redact_paths
from governor.settings import Settings

# NVML families shown on the page, by the key the page reads.
GPU_FAMILIES = {
    "governor_gpu_utilization_ratio": "utilization",
    "governor_gpu_memory_used_bytes": "memory_used_bytes",
    "governor_gpu_memory_total_bytes": "memory_total_bytes",
}
# The runner switch Governor sets for the engines it starts (engine/flags.py).
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
ADAPTER_FIELDS = ("name", "state", "tier", "pinned", "last_used", "in_flight", "waiting", "version", "source")


class StatusReader:
    """Builds the status snapshot; keeps each engine's version (asked again when the engine restarts)."""

    def __init__(
        self, settings: Settings, pool: EnginePool, registry: AdapterRegistry | None, metrics: GatewayMetrics
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._registry = registry
        self._metrics = metrics
        self._versions: dict[str, tuple[int, str]] = {}  # engine name -> (generation asked at, version)

    async def snapshot(self) -> dict[str, Any]:
        """Everything the status view shows, read now."""
        m = self._metrics
        requests = _sum_by_model(m.requests.series())
        return {
            "time": time.time(),
            "model": self._pool.served_model,
            "engines": [await self._engine(e) for e in self._pool.engines],
            "lora": self._settings.lora,
            "adapters": self._adapters(requests),
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

    async def _engine(self, engine: EngineClient) -> dict[str, Any]:
        return {
            "name": engine.name,
            "state": engine.state.value,
            "kind": "local" if isinstance(engine, VllmProcess) else "remote",
            "restarts": engine.restarts if isinstance(engine, VllmProcess) else 0,
            "outstanding": engine.outstanding,
            "version": await self._version(engine),
            "runner": _runner(engine),
        }

    async def _version(self, engine: EngineClient) -> str | None:
        known = self._versions.get(engine.name)
        if known is not None and known[0] == engine.generation:
            return known[1]
        if engine.state != EngineState.READY:
            return known[1] if known else None
        try:
            status, body = await engine.request_json("GET", "/version", timeout=2.0)
        except EngineUnavailable:
            return None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("version"), str):
            return None
        self._versions[engine.name] = (engine.generation, body["version"])
        return body["version"]

    def _adapters(self, requests: dict[str, float]) -> list[dict[str, Any]]:
        if self._registry is None or not self._settings.lora:
            return []
        out = []
        for described in self._registry.list():
            row = {k: described.get(k) for k in ADAPTER_FIELDS}
            row["reason"] = redact_paths(described["reason"]) if described.get("reason") else None
            row["requests"] = requests.get(described["name"], 0.0)
            out.append(row)
        return out

    def _gpus(self) -> list[dict[str, Any]]:
        """One row per GPU NVML reads and finds up; empty without NVML (a CPU machine)."""
        gpus: dict[tuple[str, str], dict[str, Any]] = {}
        available = False
        for family in self._metrics.registry.collect():
            if family.name == "governor_gpu_available":
                available = any(s.value == 1.0 for s in family.samples)
            key = GPU_FAMILIES.get(family.name)
            if key is None:
                continue
            for sample in family.samples:
                index, name = sample.labels.get("gpu", ""), sample.labels.get("name", "")
                gpus.setdefault((index, name), {"index": index, "name": name})[key] = sample.value
        return list(gpus.values()) if available else []


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
