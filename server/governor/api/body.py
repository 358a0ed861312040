"""Request bodies, bounded before they are buffered (FastAPI's own body parsing reads them whole first)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from governor.errors import InvalidRequest, PayloadTooLarge


async def read_bytes(request: Request, limit: int) -> bytes:
    """The body: 413 past `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body exceeds {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object in the body: 413 past `limit` bytes (declared or sent), 400 if not a JSON object."""
    raw = await read_bytes(request, limit)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object.", code="invalid_json")
    return data
