"""Engines only Governor can reach (issue 17): the engine Governor started has no TCP port that answers
the API, listens on a Unix socket in a directory only Governor's user can enter, refuses /v1 without
the key Governor holds, and holds none of Governor's own keys. Through Governor everything works.
Uses the session engine (no extra start)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Live

pytestmark = pytest.mark.engine
PATHS = ("/v1/completions", "/v1/load_lora_adapter", "/invocations", "/tokenize")


def engine_processes(live: Live) -> list[psutil.Process]:
    """Everything below Governor: watchdog, API server, EngineCore, workers."""
    return psutil.Process(live.proc.pid).children(recursive=True)


def api_server(live: Live) -> psutil.Process:
    (pid,) = live.engine_pids()
    return psutil.Process(pid)


def over_socket(sock: Path, path: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 1, "lora_name": "x", "lora_path": "/etc"}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=60) as client:
        return client.post("http://engine" + path, json=body, headers=headers).status_code


def tcp_listeners(procs: list[psutil.Process]) -> dict[int, str]:
    """Listening TCP ports of these processes -> the process's name."""
    found = {}
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({c.laddr.port: proc.name() for c in proc.net_connections("tcp") if c.status == "LISTEN"})
    return found


def answering(ports: list[int]) -> list[tuple[int, str, int]]:
    """(port, path, status) for every port and path that gave an HTTP answer."""

    def ask(port: int, path: str) -> tuple[int, str, int] | None:
        try:
            reply = httpx.post(f"http://127.0.0.1:{port}{path}", json={"prompt": "Hi"}, timeout=2)
            return port, path, reply.status_code
        except httpx.HTTPError:
            return None

    with ThreadPoolExecutor(16) as pool:
        found = pool.map(lambda pp: ask(*pp), [(port, path) for port in ports for path in PATHS])
        return [f for f in found if f]


def test_the_api_server_listens_on_no_tcp_port(live: Live) -> None:
    """The HTTP app is on the socket only. vLLM's workers do listen on loopback (torch.distributed's
    gloo): tests/integration/test_z_engine_restart.py sends those ports the API calls just before it
    kills Governor, since speaking HTTP to gloo could disturb the session's engine."""
    server = api_server(live)
    assert tcp_listeners([server, server.parent()]) == {}  # API server and watchdog


def test_socket_directory_is_private_and_v1_needs_the_key(live: Live) -> None:
    sock = live.engine_socket()
    info = sock.parent.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert over_socket(sock, "/v1/completions", None) == 401
    assert over_socket(sock, "/v1/load_lora_adapter", None) == 401
    assert over_socket(sock, "/v1/completions", "not-the-key") == 401
    key = api_server(live).environ()["VLLM_API_KEY"]  # readable by Governor's own user only
    assert over_socket(sock, "/v1/completions", key) == 200  # the socket works: the refusals are the key's


def test_another_user_cannot_connect(live: Live) -> None:
    """As root (the test machine), try from uid 65534: the 0700 directory stops it before the socket."""
    if os.getuid() != 0:
        assert stat.S_IMODE(live.engine_socket().parent.stat().st_mode) == 0o700
        return
    code = ("import os, socket, sys; os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(live.engine_socket())], timeout=30, check=False)
    assert done.returncode == 13


def test_engine_holds_no_governor_secret_and_no_key_on_a_command_line(live: Live) -> None:
    server = api_server(live)
    env = server.environ()
    assert not [k for k in env if k.startswith("GOVERNOR_")], "Governor's settings leaked into the engine"
    key = env["VLLM_API_KEY"]
    assert len(key) >= 32
    for proc in engine_processes(live):
        assert not any(key in part for part in proc.cmdline())


def test_through_governor_everything_works(live: Live) -> None:
    body = {"model": live.model, "prompt": "Hi", "max_tokens": 3}
    assert httpx.post(live.v1 + "/completions", json=body, timeout=60).status_code == 200
    # the engine's own series, scraped over the socket (vllm:num_requests_running is Governor's own count)
    assert "governor_engine_num_requests_running{" in httpx.get(live.url + "/metrics", timeout=10).text
