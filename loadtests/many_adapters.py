"""A thousand registered adapters: p50/p95 of GET /v1/models and GET /metrics, the gateway's memory growth,
and a restart that restores them all without loading them all (goals: p95 < 50 ms and < 20 ms, < 100 MB).

    python loadtests/many_adapters.py --count 1000 --requests 200

Starts a fake vLLM and `governor serve` in front of it (remote mode, shared staging dir), writes COUNT tiny
real adapters (peft, rank 1, ~5 KB each) into a temporary adapters root, registers each through the admin
API without loading it (`"load": false`), sends a few requests to some of them (loads and evictions), then
times the two routes one request at a time. The gateway's RSS is read from /proc before registering and
after. Loopback only; everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from governor.bench.processes import spawned
from governor.engine.process import free_port

ADMIN = "bench-admin"


def tiny_adapter(dest: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = Path.home() / ".cache" / "governor" / "models" / "SmolLM2-135M-Instruct"
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj"], layers_to_transform=[0],
                        init_lora_weights=False)  # fmt: skip
    get_peft_model(model, config).save_pretrained(str(dest))
    config_file = dest / "adapter_config.json"  # the fake engine serves "fake-model": name it as the base
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "fake-model"}))
    return dest


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def gateway(work: Path, engine_url: str, slots: int) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    env = {**os.environ, "GOVERNOR_ENGINE_URL": engine_url, "GOVERNOR_PORT": str(port),
           "GOVERNOR_ADAPTERS_DIR": str(work / "adapters"), "GOVERNOR_STATE_DIR": str(work / "state"),
           "GOVERNOR_STAGING_DIR": str(work / "staged"), "GOVERNOR_ADMIN_KEY": ADMIN,
           "GOVERNOR_WATCH_ADAPTERS": "false", "GOVERNOR_MAX_CPU_LORAS": str(slots),
           "GOVERNOR_LOG_LEVEL": "warning"}  # fmt: skip
    with spawned([sys.executable, "-m", "governor", "serve"], env=env, log=work / f"gov-{port}.log") as watchdog:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + "/ready")
        server = next(p for p in psutil.Process(watchdog.pid).children(recursive=True) if "serve" in p.cmdline())
        yield url, server


def timed(client: httpx.Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = client.get(path)
        out.append((time.perf_counter() - start) * 1000)
        assert r.status_code == 200, r.text
    return out


def summary(name: str, ms: list[float]) -> str:
    p95 = statistics.quantiles(ms, n=20)[18]
    return f"{name}: p50 {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, max {max(ms):.1f} ms (n={len(ms)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=200, help="Timed GETs per route.")
    ap.add_argument("--slots", type=int, default=32, help="GOVERNOR_MAX_CPU_LORAS.")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="governor-many-adapters-"))
    source = tiny_adapter(work / "tiny")
    names = [f"m-{i:04d}" for i in range(args.count)]
    for name in names:
        shutil.copytree(source, work / "adapters" / name)
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with spawned([sys.executable, "-m", "governor.bench.fake_engine", str(engine_port)]):
        wait_ready(engine_url + "/health")
        with gateway(work, engine_url, args.slots) as (url, server), httpx.Client(base_url=url, timeout=60) as c:
            before = server.memory_info().rss
            for name in names:
                r = c.post("/admin/adapters", json={"name": name, "path": name, "load": False}, headers=admin)
                assert r.status_code == 200, r.text
            for name in names[:: max(1, args.count // (args.slots * 2))]:
                r = c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
                assert r.status_code == 200, r.text
            grown = (server.memory_info().rss - before) / 2**20
            listed = len(c.get("/v1/models").json()["data"]) - 1
            print(f"{listed} adapters registered; gateway RSS grew {grown:.1f} MB")
            print(summary("GET /v1/models", timed(c, "/v1/models", args.requests)))
            print(summary("GET /metrics", timed(c, "/metrics", args.requests)))
        with gateway(work, engine_url, args.slots) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
            states = [a["state"] for a in c.get("/admin/adapters", headers=admin).json()["data"]]
            print(f"after a restart: {len(states)} registered, {states.count('ready')} loaded in the engine")


if __name__ == "__main__":
    main()
