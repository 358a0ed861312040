"""A zero-latency fake vLLM server: OpenAI-shaped SSE as fast as Python can write it.

Used by the relay-capacity benchmark and by unit tests that need real HTTP without a model. A request
whose prompt holds `[fake-fault:MODE]` fails the way a real engine can, after FAULT_AFTER tokens
(see FAULTS), so tests can check that Governor passes every failure on.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import orjson
from aiohttp import web

MODEL = "fake-model"
_WORDS = (
    "river", "stone", "maple", "lantern", "orbit", "velvet", "harbor", "quartz", "meadow", "ember", "falcon",
    "tundra", "cobalt", "willow", "canyon", "saffron", "glacier", "thistle", "beacon", "marble", "prairie",
)  # fmt: skip
# Varied text: a repeating fake stream would (rightly) be cut by the loop detector.
_RNG = random.Random(7)
_STREAM = [" " + _RNG.choice(_WORDS) for _ in range(65536)]

# vLLM's error body (`ErrorResponse.model_dump()` through json.dumps, so with spaces): in a stream it is
# sent as an event, then [DONE]; without streaming it is the body, with `code` as the HTTP status.
FAULTS: dict[str, dict[str, Any]] = {
    "error": {"message": "fake engine: token id 99999 is out of vocabulary", "type": "BadRequestError",
              "param": "stop_token_ids", "code": 400},
    "error500": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500},
    "garbage": {},  # an event that is not JSON, in the middle of the stream
}  # fmt: skip
FAULT_AFTER = 3
_FAULT = re.compile(r"\[fake-fault:([a-z0-9]+)\]")
GARBAGE_EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "cut\n\n'


def _chunk(kind: str, rid: str, text: str, finish: str | None, usage: dict[str, int] | None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if kind == "chat":
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    body: dict[str, Any] = {"id": rid, "object": obj, "created": 0, "model": MODEL, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


class FakeEngine:
    """Streams `max_tokens` events of `text` (a word by default); `script` may set the texts to stream.
    `stall_after`: a stream stops after that many tokens and waits for its client to leave (a generation
    that outlasts its client), so a test can hang up at a chosen point."""

    def __init__(self, script: list[str] | None = None, delay: float = 0.0, stall_after: int | None = None) -> None:
        self.script = script
        self.delay = delay
        self.stall_after = stall_after
        self.stalled = 0  # streams that reached stall_after
        self.requests: list[dict[str, Any]] = []
        self.aborted = 0
        self.active = 0
        self.loaded: dict[str, str] = {}
        self.peers: list[object] = []  # client address of each generation request (connection reuse)
        self.health_checks = 0
        self.app = web.Application()
        self.app.add_routes([
            web.get("/health", self.health), web.get("/v1/models", self.models), web.get("/metrics", self.metrics),
            web.post("/v1/chat/completions", self.chat), web.post("/v1/completions", self.completions),
            web.post("/v1/load_lora_adapter", self.load), web.post("/v1/unload_lora_adapter", self.unload),
        ])  # fmt: skip

    async def health(self, _: web.Request) -> web.Response:
        self.health_checks += 1
        return web.Response(text="")

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def metrics(self, _: web.Request) -> web.Response:
        text = (
            "# HELP vllm:num_requests_running Number of requests running.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{MODEL}"}} {self.active}\n'
        )
        return web.Response(text=text)

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.loaded[body["lora_name"]] = body["lora_path"]
        return web.Response(text="ok")

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.loaded.pop(body["lora_name"], None)
        return web.Response(text="ok")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        n_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        if self.script is not None:
            texts = self.script[:n_tokens]
        else:
            start = len(self.requests) * 7919 % (len(_STREAM) - n_tokens) if n_tokens < len(_STREAM) else 0
            texts = _STREAM[start : start + n_tokens]
        rid = f"fake-{len(self.requests)}"
        fault = _fault(body)
        if fault == "garbage" and not body.get("stream"):
            return web.Response(text='{"id": "cut', content_type="application/json")
        if fault in ("error", "error500") and not body.get("stream"):
            error = FAULTS[fault]
            text = json.dumps({"error": error})
            return web.Response(text=text, status=error["code"], content_type="application/json")
        usage_every = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
        if not body.get("stream"):
            if self.stall_after is not None and self.stall_after < len(texts):
                self.active += 1
                try:
                    await self._stall(request)
                except asyncio.CancelledError:
                    self.aborted += 1
                    raise
                finally:
                    self.active -= 1
                return web.Response(status=499)
            text = "".join(texts)
            msg = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text}
            return web.json_response({
                "id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": 0,
                "model": MODEL, "choices": [{"index": 0, **msg, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 4, "completion_tokens": len(texts), "total_tokens": 4 + len(texts)},
            })  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.active += 1
        try:
            for i, text in enumerate(texts):
                if i == self.stall_after:
                    await self._stall(request)
                    return resp
                if fault is not None and i == FAULT_AFTER:
                    if fault == "garbage":
                        await resp.write(GARBAGE_EVENT)
                    else:
                        await resp.write(b"data: " + json.dumps({"error": FAULTS[fault]}).encode() + b"\n\n")
                        await resp.write(b"data: [DONE]\n\n")
                        return resp
                last = i == len(texts) - 1
                usage = {"prompt_tokens": 4, "completion_tokens": i + 1, "total_tokens": 5 + i} if usage_every else None
                await resp.write(_chunk(kind, rid, text, "length" if last else None, usage))
                if self.delay:
                    await asyncio.sleep(self.delay)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage_body = {"id": rid, "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [],
                              "usage": {"prompt_tokens": 4, "completion_tokens": len(texts),
                                        "total_tokens": 4 + len(texts)}}  # fmt: skip
                await resp.write(b"data: " + orjson.dumps(usage_body) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            self.aborted += 1  # the client closed the stream: what vLLM takes as an abort
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        finally:
            self.active -= 1
        return resp

    async def _stall(self, request: web.Request) -> None:
        """Wait until the client closes the connection (aiohttp may also cancel the handler then)."""
        self.stalled += 1
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.005)
        self.aborted += 1


def _fault(body: dict[str, Any]) -> str | None:
    """The fault a request asks the fake for in its prompt, if any."""
    prompt = body.get("prompt") if "prompt" in body else body.get("messages")
    found = _FAULT.search(prompt if isinstance(prompt, str) else json.dumps(prompt))
    return found[1] if found and found[1] in FAULTS else None


async def serve(engine: FakeEngine, port: int, host: str = "127.0.0.1") -> web.AppRunner:
    runner = web.AppRunner(engine.app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def main(port: int, delay: float = 0.0) -> None:
    """Run a fake engine until interrupted (benchmarks and tests start it as a subprocess)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def forever() -> None:
        await serve(FakeEngine(delay=delay), port)
        await asyncio.Event().wait()

    try:
        asyncio.run(forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
