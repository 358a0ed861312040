"""Shared fixtures. `live` starts the real `governor serve` (real vLLM on the embedded model) once
per test session; unit tests use the fake engine over real HTTP instead."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from governor.engine.process import free_port

ADMIN_KEY = "test-admin-key"
START_TIMEOUT = 600.0
# The session's `live` server; also the Governor tests/integration/test_engine_restart.py starts in its place.
# Every test client is one address: the soak sample runs 200 streams from it (default limit 64).
LIVE_SETTINGS = {"GOVERNOR_MAX_LORA_RANK": "16", "GOVERNOR_ADDRESS_CONCURRENCY": "256"}


@dataclass
class Live:
    """A running Governor with a real engine."""

    url: str
    proc: subprocess.Popen[bytes]
    adapters_dir: Path
    log_path: Path
    model: str = "SmolLM2-135M-Instruct"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def engine_pids(self) -> list[int]:
        """The vLLM API server processes the gateway supervises (each under its watchdog)."""
        parent = psutil.Process(self.proc.pid)
        server = ["vllm.entrypoints.openai.api_server"]
        pids = []
        for p in parent.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if p.cmdline()[2:3] == server:
                    pids.append(p.pid)
        return pids

    def engine_socket(self) -> Path:
        """The Unix socket the (single) vLLM API server listens on: its `--uds`."""
        (pid,) = self.engine_pids()
        command = psutil.Process(pid).cmdline()
        return Path(command[command.index("--uds") + 1])

    def engine_headers(self) -> dict[str, str]:
        """The key the (single) engine wants on every route (engine/guard.py), read from its environment
        as only Governor's user can."""
        (pid,) = self.engine_pids()
        return {"Authorization": f"Bearer {psutil.Process(pid).environ()['VLLM_API_KEY']}"}

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Name the order the tests ran in, also under -q (which hides pytest-randomly's header line)."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.hasplugin("randomly") and isinstance(seed, int):
        terminalreporter.write_line(f"random test order (pytest-randomly): rerun it with --randomly-seed={seed}")


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll until predicate() is truthy; fail at the deadline (no fixed sleeps in tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def start_governor(root: Path, **env: str) -> Iterator[Live]:
    """`governor serve` on the embedded model with a real vLLM engine, until /ready; stopped after."""
    adapters = root / "adapters"
    adapters.mkdir(exist_ok=True)
    port = free_port()
    log_path = root / "governor.log"
    full = {
        **os.environ,
        "GOVERNOR_PORT": str(port),
        "GOVERNOR_ENFORCE_EAGER": "true",  # ~50 s start instead of ~2.5 min compile; tests need no peak speed
        "GOVERNOR_ADAPTERS_DIR": str(adapters),
        "GOVERNOR_STATE_DIR": str(root / "state"),
        "GOVERNOR_CACHE_DIR": os.environ.get("GOVERNOR_CACHE_DIR", str(Path.home() / ".cache" / "governor")),
        "GOVERNOR_ADMIN_KEY": ADMIN_KEY,
        "GOVERNOR_LOG_LEVEL": "info",
        **env,
    }
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "governor", "serve"], env=full, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    server = Live(f"http://127.0.0.1:{port}", proc, adapters, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"governor did not become ready:\n{server.log_tail()}")
            time.sleep(1)
        yield server
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with start_governor(tmp_path_factory.mktemp("live"), **LIVE_SETTINGS) as server:
        yield server
