"""Engines only Governor can reach (issues 17 and 28): the engine Governor started has no TCP port that
answers the API, listens on a Unix socket in a directory only Governor's user can enter, refuses every
route without the key Governor holds (not only vLLM's guarded prefixes: also the SageMaker routes, /tokenize,
/metrics, /docs, unknown paths), and holds none of Governor's own keys. Through Governor everything works.
Uses the session engine (no extra start); the route list comes from the installed vLLM's app, built from
the live engine's own arguments and environment (tests/integration/engine_routes.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Live, ready, wait_for

pytestmark = pytest.mark.engine
# Sent to the workers' loopback ports (gloo), which should give no HTTP answer at all: any path will do.
TCP_PROBE_PATHS = ("/v1/completions", "/v1/load_lora_adapter", "/invocations", "/tokenize")
REPO = Path(__file__).resolve().parents[2]


def engine_processes(live: Live) -> list[psutil.Process]:
    """Everything below Governor: watchdog, API server, EngineCore, workers."""
    return psutil.Process(live.proc.pid).children(recursive=True)


def engine_up(live: Live) -> None:
    """Wait until the engine serves: on a loaded machine it may have missed its health checks (listing the
    routes imports vLLM, a core for ~20 s) and be restarting, on the same socket."""
    wait_for(lambda: ready(live.url), timeout=600, interval=1, what="the engine back after a restart")


def api_server(live: Live) -> psutil.Process:
    """The engine's API server, once it serves."""
    engine_up(live)
    (pid,) = live.engine_pids()
    return psutil.Process(pid)


def over_socket(sock: Path, path: str, key: str | None, method: str = "POST") -> int:
    """The status one request gets from the engine's socket; a body (a harmless one) goes with all but GET/HEAD."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 1, "lora_name": "x", "lora_path": "/etc"}
    json_body = None if method in ("GET", "HEAD") else body
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=60) as client:
        return client.request(method, "http://engine" + path, json=json_body, headers=headers).status_code


def concrete(path: str) -> str:
    """A route's template with each {parameter} filled by a name no adapter or response has."""
    return re.sub(r"\{[^}]+\}", "governor-probe", path)


@pytest.fixture(scope="module")
def engine_routes(live: Live) -> set[tuple[str, str]]:
    """(method, path template) for every route the live engine's app mounts (WebSocket routes as GET)."""
    server = api_server(live)
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.engine_routes", *server.cmdline()[3:]],
        env=server.environ(), cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    listed = json.loads(done.stdout.strip().splitlines()[-1])  # vLLM logs to stdout before it
    return {(method, path) for _kind, methods, path in listed for method in methods}


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
        found = pool.map(lambda pp: ask(*pp), [(port, path) for port in ports for path in TCP_PROBE_PATHS])
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


def test_the_route_list_is_the_engines(engine_routes: set[tuple[str, str]]) -> None:
    """Built from the engine's own arguments and environment: every route Governor calls is there, the LoRA
    routes only runtime LoRA updating mounts, and the routes issue 28 found open (SageMaker-style). Not
    checked against the live engine's /openapi.json: building that schema holds vLLM's event loop for
    seconds, long enough on a loaded machine for its health checks to fail."""
    governors = {("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                 ("POST", "/v1/chat/completions"), ("POST", "/v1/load_lora_adapter"),
                 ("POST", "/v1/unload_lora_adapter")}  # fmt: skip
    assert governors <= engine_routes
    assert {("POST", "/adapters"), ("DELETE", "/adapters/{adapter_name}"), ("POST", "/invocations")} <= engine_routes


def refusals(sock: Path, asked: set[tuple[str, str]], key: str | None) -> dict[tuple[str, str], int | str]:
    """What each (method, path) got from the engine without the right key: a status, or the error that
    ended the call. An empty JSON body with all but GET/HEAD, so an unguarded handler does nothing."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    got: dict[tuple[str, str], int | str] = {}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=60) as client:
        for method, path in sorted(asked):
            body = None if method in ("GET", "HEAD") else {}
            try:
                got[method, path] = client.request(
                    method, "http://engine" + path, json=body, headers=headers
                ).status_code
            except httpx.HTTPError as exc:
                got[method, path] = type(exc).__name__
    return got


def test_every_engine_route_refuses_a_request_without_the_key(live: Live, engine_routes: set[tuple[str, str]]) -> None:
    """vLLM's own key guards only /v1, /v2, /inference and /cohere; Governor's guard (engine/guard.py)
    guards the rest. Unknown paths and OPTIONS are refused as well: nothing is answered without the key."""
    api_server(live)
    sock = live.engine_socket()
    asked = {(method, concrete(path)) for method, path in engine_routes}
    asked |= {("GET", "/no-such-route"), ("OPTIONS", "/v1/completions"), ("OPTIONS", "/invocations")}
    for key in (None, "not-the-key"):
        answered = {route: got for route, got in refusals(sock, asked, key).items() if got != 401}
        assert answered == {}, f"answered with key {key!r}: {answered}"


def test_governors_probes_pass_the_guard(live: Live) -> None:
    """Governor sends the key on every call (engine/remote.py), health checks and /metrics scrapes included."""
    engine_up(live)
    sock = live.engine_socket()
    key = api_server(live).environ()["VLLM_API_KEY"]
    for path in ("/health", "/metrics", "/v1/models"):
        assert over_socket(sock, path, key, "GET") == 200, path


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
