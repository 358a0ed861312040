"""EngineKeyGuard: an ASGI middleware, loaded into the vLLM engines Governor starts (`--middleware`), that
refuses every request without the engine's key.

vLLM's own key (VLLM_API_KEY) guards only the paths under /v1, /v2, /inference and /cohere. The rest of its
app answers anyone who can connect: /tokenize, /metrics, /docs, /scale_elastic_ep, and with runtime LoRA
updating on (Governor's engines have it) the SageMaker routes from `model_hosting_container_standards`,
POST /adapters, DELETE /adapters/{name} and /invocations. This guard wants `Authorization: Bearer <key>`
on every HTTP and WebSocket request, whatever the path or method (OPTIONS and unknown paths too): Governor
sends the key on every call it makes, health checks and /metrics scrapes included (engine/remote.py).

It runs inside the engine process, so it imports only the standard library and reads its key from the
engine's environment (the one place outside Settings that does: the engine gets no Governor settings).
Without a key it refuses to start, and the engine with it, rather than serve unguarded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

KEY_ENV = "VLLM_API_KEY"  # vLLM reads the same variable for the prefixes it guards itself
# vLLM splits `--middleware` at the last dot: module path, then the class.
MIDDLEWARE_PATH = "governor.engine.guard.EngineKeyGuard"
# Added by VllmProcess, which gives the engine its key: an engine without one (the benchmarks' direct
# vLLM) would refuse to start with the guard.
GUARD_FLAGS = ("--middleware", MIDDLEWARE_PATH)
# RFC 6455 7.4.1 "policy violation": a WebSocket closed before it is accepted becomes an HTTP 403.
WS_POLICY_VIOLATION = 1008

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REFUSAL = json.dumps({"error": "Unauthorized"}).encode()  # the body vLLM's own guard sends


def _digest(token: bytes) -> bytes:
    # Compared as fixed-length digests: compare_digest leaks the length of its inputs, not their content.
    return hashlib.sha256(token).digest()


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's one `Authorization: Bearer` header; None when absent, repeated or another scheme."""
    values = [value for name, value in scope.get("headers", ()) if name.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(b" ")
    return token if scheme.lower() == b"bearer" and token else None


class EngineKeyGuard:
    """Refuses (401, or a WebSocket close) every request whose bearer token is not the engine's key."""

    def __init__(self, app: ASGIApp, key: str | None = None) -> None:
        """key: the engine's key; by default VLLM_API_KEY from the environment (vLLM passes only `app`)."""
        key = os.environ.get(KEY_ENV, "") if key is None else key
        if not key:
            raise RuntimeError(f"EngineKeyGuard needs the engine's key in {KEY_ENV}: refusing to serve unguarded")
        self.app = app
        self._key_digest = _digest(key.encode())

    def allows(self, scope: Scope) -> bool:
        """Whether the request carries the key (compared in constant time)."""
        token = bearer_token(scope)
        return token is not None and hmac.compare_digest(_digest(token), self._key_digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or self.allows(scope):  # lifespan passes
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": ""})
        else:
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_REFUSAL)).encode()),
                (b"www-authenticate", b"Bearer"),
            ]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": _REFUSAL})
