"""Graceful drain of a real `governor serve` process: SIGTERM while streams run → /ready 503 at once,
the listener stays open for GOVERNOR_DRAIN_SECONDS answering new requests with 503, every running
stream completes, then the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx

from tests.conftest import wait_for
from tests.fuzz_support import PROCESSES, fake_backed_governor

STREAMS = 5


def test_sigterm_drains(monkeypatch: object) -> None:
    # ~0.02 s per event x 200 events: each stream runs ~4 s, longer than the drain delay.
    with fake_backed_governor(delay=0.02, GOVERNOR_DRAIN_SECONDS="2") as url:
        proc = PROCESSES[url]
        results: list[str] = []
        started = threading.Barrier(STREAMS + 1)

        def stream() -> None:
            body = {"model": "fake-model", "prompt": "x", "max_tokens": 200, "stream": True, "decoding_preset": "off"}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                chunks = r.iter_text()
                text = next(chunks)
                started.wait(30)
                text += "".join(chunks)
            results.append(text)

        threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
        for t in threads:
            t.start()
        started.wait(30)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        wait_for(lambda: httpx.get(url + "/ready", timeout=5).status_code == 503, 1, interval=0.05,
                 what="/ready to answer 503 right after SIGTERM")  # fmt: skip
        r = httpx.post(
            url + "/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 2}, timeout=10
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert proc.poll() is None  # still listening during the drain delay
        for t in threads:
            t.join(60)
        assert len(results) == STREAMS
        for text in results:
            assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
        assert proc.wait(60) == 0
        assert time.monotonic() - sent >= 2.0


def test_a_chunked_body_past_the_limit_is_413_over_http() -> None:
    """A body sent without Content-Length (chunked) is bounded by counting its bytes as uvicorn delivers
    them; one under the limit, sent the same way, is served."""

    def chunks(body: bytes) -> Iterator[bytes]:
        yield from (body[i : i + 512] for i in range(0, len(body), 512))

    def post(content: str) -> httpx.Response:
        body = {"model": "fake-model", "prompt": content, "max_tokens": 2}
        return httpx.post(url + "/v1/completions", content=chunks(json.dumps(body).encode()),
                          headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip

    with fake_backed_governor(GOVERNOR_MAX_BODY_BYTES="2048") as url:
        r = post("x" * 5000)
        assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert post("x" * 1900).status_code == 200


def test_an_idle_client_connection_outlives_common_client_pools() -> None:
    """A pooled client connection idle for 6 s (uvicorn's default keeps one 5 s; aiohttp pools them 15 s)
    must still work: a server that closes first races the client's reuse and drops its next request."""
    with fake_backed_governor() as url:
        host, port = url.removeprefix("http://").split(":")
        request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(6)
            sock.sendall(request)
            assert read_response(sock).startswith(b"HTTP/1.1 200"), "the idle connection was closed"


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (head and Content-Length body): the head and body may arrive in separate
    segments, and a body left unread would be taken for the next response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
