"""The two engine calls the registry makes: vLLM's runtime LoRA load and unload endpoints."""

from __future__ import annotations

import logging
from typing import Any

from governor.engine.base import EngineClient
from governor.errors import EngineUnavailable, InvalidRequest

log = logging.getLogger("governor.lora")

# A cold load reads the weights and may compile kernels; generous, but bounded.
LOAD_TIMEOUT = 120.0
UNLOAD_TIMEOUT = 30.0


def engine_message(body: Any) -> str:
    """vLLM's error text from either error shape ({"error": {...}} or {"message": ...}) or plain text."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(body or "no message")[:2000]


async def load_on(engine: EngineClient, internal: str, path: str) -> None:
    """Load one adapter version from `path` (its staged copy as the engine sees it); EngineUnavailable if the
    engine cannot be reached, InvalidRequest if it refuses."""
    body = {"lora_name": internal, "lora_path": path}
    status, answer = await engine.request_json("POST", "/v1/load_lora_adapter", body, timeout=LOAD_TIMEOUT)
    if status == 400 and "already been loaded" in engine_message(answer):
        # Left over from an earlier gateway run against the same engine: replace it so the weights are ours.
        await unload_on(engine, internal)
        status, answer = await engine.request_json("POST", "/v1/load_lora_adapter", body, timeout=LOAD_TIMEOUT)
    if status == 200:
        return
    message = engine_message(answer)
    if status == 503:
        raise EngineUnavailable(f"Engine '{engine.name}' could not load the adapter now ({message}); retry shortly.")
    raise InvalidRequest(f"engine '{engine.name}' refused the adapter (HTTP {status}): {message}", param="path")


async def unload_on(engine: EngineClient, internal: str) -> None:
    """Unload one adapter version; an adapter the engine no longer has counts as unloaded."""
    body = {"lora_name": internal}
    status, answer = await engine.request_json("POST", "/v1/unload_lora_adapter", body, timeout=UNLOAD_TIMEOUT)
    if status not in (200, 404):
        log.warning(
            "engine did not unload adapter: HTTP %s %s", status, engine_message(answer),
            extra={"engine": engine.name, "adapter": internal},
        )  # fmt: skip
