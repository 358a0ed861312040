"""Shared by the fuzz tests: a Governor in front of the fake engine, and the response checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from governor.engine.process import free_port

ADMIN = "fuzz-admin"
PROCESSES: dict[str, subprocess.Popen[bytes]] = {}  # url -> the governor process, for signal tests
ENGINES: dict[str, str] = {}  # url -> the fake engine's URL behind it, to call it directly


@contextmanager
def fake_backed_governor(delay: float = 0.0, **env: str) -> Iterator[str]:
    """`governor serve` (a real process) in front of the zero-latency fake engine; yields its URL."""
    fake_port, port = free_port(), free_port()
    scratch = Path(tempfile.mkdtemp(prefix="governor-fuzz-"))
    (scratch / "adapters").mkdir()
    fake = subprocess.Popen([sys.executable, "-m", "governor.bench.fake_engine", str(fake_port), str(delay)])
    full = {**os.environ, "GOVERNOR_ENGINE_URL": f"http://127.0.0.1:{fake_port}", "GOVERNOR_PORT": str(port),
            "GOVERNOR_WATCH_ADAPTERS": "false", "GOVERNOR_ADMIN_KEY": ADMIN, "GOVERNOR_DRAIN_SECONDS": "0",
            "GOVERNOR_LOG_LEVEL": "error", "GOVERNOR_ADAPTERS_DIR": str(scratch / "adapters"),
            "GOVERNOR_STATE_DIR": str(scratch / "state"), **env}  # fmt: skip
    gw = subprocess.Popen([sys.executable, "-m", "governor", "serve"], env=full)
    url = f"http://127.0.0.1:{port}"
    PROCESSES[url] = gw
    ENGINES[url] = f"http://127.0.0.1:{fake_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or gw.poll() is not None:
                raise RuntimeError("fake-backed governor did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        for proc in (gw, fake):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        PROCESSES.pop(url, None)
        ENGINES.pop(url, None)
        shutil.rmtree(scratch, ignore_errors=True)


def check_response(status: int, body: Any, content_type: str) -> None:
    """No 5xx; every error is exactly the OpenAI envelope."""
    assert status < 500, (status, body)
    if status >= 400:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"], body


def tame(case: Any, cap: int = 16) -> None:
    """Keep generated generation requests short against a real engine (validity unchanged)."""
    body = case.body
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and not isinstance(body[field], bool) and body[field] > cap:
                body[field] = cap
        if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 2:
            body["n"] = 2


def fuzz_all_operations(url: str, examples: int, cap_generation: bool = False) -> dict[str, int]:
    """Run schemathesis-generated cases for every operation; returns cases run per operation.

    Driven through hypothesis directly: schemathesis's pytest plugin does not load under pytest 9."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    counts: dict[str, int] = {}

    def runner(label: str, strategy: Any) -> Any:
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)  # fmt: skip
        @given(case=strategy)
        def run(case: Any) -> None:
            counts[label] += 1
            if cap_generation:
                tame(case)
            auth = {"Authorization": f"Bearer {ADMIN}"} if case.path.startswith("/admin") else {}
            response = case.call(base_url=url, headers=auth, timeout=120)
            try:
                body = response.json()
            except ValueError:
                body = response.text
            check_response(response.status_code, body, response.headers.get("content-type", ""))

        return run

    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        counts[label] = 0
        runner(label, operation.as_strategy())()
    return counts
