"""Killing the engine: open streams end with an error event, /ready turns 503 within 5 s, the
supervisor restarts vLLM and /ready is 200 again without restarting Governor.

Named test_z_* so it runs last in the session: the restart costs about a minute of engine start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import Live, ready, wait_for
from tests.integration.adapters import random_adapter

pytestmark = pytest.mark.engine
STREAMS = 20


def _stream(live: Live, results: list[list[str]], started: threading.Barrier) -> None:
    body = {"model": live.model, "prompt": "Tell a very long story:", "max_tokens": 3000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    events: list[str] = []
    try:
        with httpx.stream("POST", live.v1 + "/completions", json=body, timeout=120) as r:
            first = True
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if first:
                        first = False
                        started.wait(60)
    except httpx.HTTPError as exc:
        events.append(f"transport error: {exc!r}")
    results.append(events)


def _adapter_ok(live: Live, name: str) -> bool:
    body = {"model": name, "prompt": "Hi", "max_tokens": 3}
    return httpx.post(live.v1 + "/completions", json=body, timeout=60).status_code == 200


def test_engine_kill_ends_streams_and_recovers(live: Live, tmp_path: Path) -> None:
    random_adapter(tmp_path / "survivor", seed=61)
    shutil.copytree(tmp_path / "survivor", live.adapters_dir / "survivor")
    wait_for(lambda: _adapter_ok(live, "survivor"), 30, what="adapter 'survivor' to serve")
    r = httpx.get(live.url + "/admin/adapters", headers=live.admin(), timeout=10)
    ready_before = {a["name"] for a in r.json()["data"] if a["state"] == "ready"}
    assert "survivor" in ready_before
    pids = live.engine_pids()
    assert len(pids) == 1, pids
    results: list[list[str]] = []
    barrier = threading.Barrier(STREAMS + 1)
    threads = [threading.Thread(target=_stream, args=(live, results, barrier)) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    barrier.wait(120)  # every stream has received its first event

    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: not ready(live.url), 5, interval=0.1, what="/ready to turn 503")
    for t in threads:
        t.join(60)
    assert len(results) == STREAMS
    for events in results:
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_unavailable"  # never reported as a successful, truncated answer

    r = httpx.get(live.url + "/ready", timeout=10)
    assert r.status_code == 503 and r.json()["error"]["type"]
    wait_for(lambda: ready(live.url), 300, interval=1, what="the supervisor to restart the engine")
    assert live.engine_pids() and live.engine_pids() != pids
    reply = httpx.post(live.v1 + "/completions", json={"model": live.model, "prompt": "Hi", "max_tokens": 3},
                       timeout=60)  # fmt: skip
    assert reply.status_code == 200
    metrics = httpx.get(live.url + "/metrics", timeout=10).text
    assert 'governor_engine_restarts_total{engine="engine-0"} 1.0' in metrics

    # every adapter that was ready before the kill is ready again, without any request asking for it
    def restored() -> bool:
        listing = httpx.get(live.url + "/admin/adapters", headers=live.admin(), timeout=10).json()["data"]
        return ready_before <= {a["name"] for a in listing if a["state"] == "ready"}

    wait_for(restored, 60, what="the adapters to be restored after the restart")
    assert _adapter_ok(live, "survivor")
