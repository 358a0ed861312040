"""DroppingFakeEngine: the fake vLLM server (named as a fake) that drops connections on demand while its
/health keeps answering 200, as a loaded vLLM does when it resets one connection or closes an idle one."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiohttp import web

from governor.bench.fake_engine import FakeEngine

# A request whose prompt holds this is dropped after the fake read it: the engine had the request.
DROP = "DROP-CONNECTION"


class DroppingFakeEngine(FakeEngine):
    """Drops (closes without an answer) requests marked with DROP, and the next `drop_reused` requests that
    arrive on a connection which already served one (the keep-alive race: a server closing an idle one)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.drop_reused = 0
        self.dropped: list[str] = []  # why each dropped request was dropped
        self._served: set[object] = set()  # the transports (connections) that served a request

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        body = await request.json()
        transport = request.transport
        reused = transport in self._served
        self._served.add(transport)
        why = None
        if DROP in json.dumps(body.get("prompt", body.get("messages"))):
            why = "marked"
        elif reused and self.drop_reused > 0:
            self.drop_reused -= 1
            why = "reused"
        if why is None:
            return await super()._generate(request, kind)
        self.dropped.append(why)
        assert transport is not None
        transport.abort()  # no answer at all: the client sees the connection end before any header
        return web.Response()  # written to a closed connection: nothing reaches the client


async def _serve_forever(port: int) -> None:
    from governor.bench.fake_engine import serve

    await serve(DroppingFakeEngine(), port)
    await asyncio.Event().wait()


if __name__ == "__main__":  # as a local engine's process: python -m tests.engine.dropping_engine PORT
    asyncio.run(_serve_forever(int(sys.argv[1])))
