"""The service's answers as Starlette responses; SSEResponse streams server-sent events and stops as soon as
the client goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from governor.errors import GovernorError
from governor.serving.service import Answer
from governor.stream.sse import DONE, error_event

log = logging.getLogger("governor.stream")


class SSEResponse(Response):
    """Like StreamingResponse, but always listens for disconnects: a client that leaves while the
    engine is still queueing (no bytes to send yet) must abort the upstream request too."""

    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.body_iterator = body
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def _pump(self, send: Send) -> None:
        body = self.body_iterator
        while True:
            try:
                chunk = await anext(body)
            except StopAsyncIteration:
                break
            except Exception:  # the relay ends its own failures; anything else must not vanish either
                log.exception("stream body failed", extra={"request_id": self.headers.get("x-request-id", "-")})
                error = GovernorError("Internal error while streaming; see the server log.", code="internal_error")
                chunk = error_event(error) + DONE
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            watch = asyncio.ensure_future(self._disconnected(receive))
            try:
                await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, watch):
                    task.cancel()
                await asyncio.gather(pump, watch, return_exceptions=True)
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
        finally:
            if self.on_close is not None:
                self.on_close()


def to_response(answer: Answer) -> Response:
    """A JSON answer as it is, a streamed one as server-sent events."""
    if answer.stream is not None:
        return SSEResponse(answer.stream, headers=answer.headers, on_close=answer.on_close)
    return Response(answer.body, media_type="application/json", headers=answer.headers)
