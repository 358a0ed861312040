"""A fake vLLM with LoRA slots, for the model-server contract tests (a fake, named so; the real engine is
tested in tests/integration/test_epp_contract_live.py).

Like vLLM's scheduler it runs at most `slots` distinct adapters at once: a request for another adapter
waits (headers sent, no token) until a slot frees. A running stream sends its first token, then waits
for `hold` before it finishes, so a test can look at the state in between without racing a clock. Its
/metrics has vLLM 0.32's shape for the families the endpoint picker reads, including vLLM's own
`lora_requests_info` with upstream names (`name@2` after a hot-swap, and vLLM's both-sets-from-one-dict
habit) — which Governor must not pass on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from governor.bench.fake_engine import MODEL, FakeEngine, _chunk

CACHE_CONFIG = (
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",'
    'gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="2048"} 1.0\n'
)


class SlotEngine(FakeEngine):
    """FakeEngine with `slots` LoRA slots and streams held after their first token until `hold` is set."""

    def __init__(self, slots: int = 2) -> None:
        super().__init__()
        self.slots = slots
        self.batch: dict[str, int] = {}  # upstream adapter name → requests running
        self.queued: list[str] = []
        self.hold = asyncio.Event()
        self.changed = asyncio.Condition()
        self.seen_models: list[str] = []

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return await super()._generate(request, kind)
        model = str(body.get("model"))
        self.seen_models.append(model)
        lora = model if model != MODEL else None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.active += 1
        try:
            if lora is not None:
                self.queued.append(lora)
                try:
                    async with self.changed:
                        await self.changed.wait_for(lambda: lora in self.batch or len(self.batch) < self.slots)
                finally:
                    self.queued.remove(lora)
                self.batch[lora] = self.batch.get(lora, 0) + 1
            try:
                await self._stream(resp, kind, body)
            finally:
                if lora is not None:
                    self.batch[lora] -= 1
                    if not self.batch[lora]:
                        del self.batch[lora]
                    async with self.changed:
                        self.changed.notify_all()
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted += 1
            raise
        finally:
            self.active -= 1
        return resp

    async def _stream(self, resp: web.StreamResponse, kind: str, body: dict[str, Any]) -> None:
        n = max(2, int(body.get("max_tokens") or 4))
        every = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
        for i in range(n):
            usage = {"prompt_tokens": 4, "completion_tokens": i + 1, "total_tokens": 5 + i} if every else None
            await resp.write(_chunk(kind, "slot", f" w{i}", "length" if i == n - 1 else None, usage))
            if i == 0:
                await self.hold.wait()
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}
            tail = {"id": "slot", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [],
                    "usage": usage}  # fmt: skip
            await resp.write(b"data: " + orjson.dumps(tail) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")

    async def metrics(self, _: web.Request) -> web.Response:
        running = ",".join(self.batch)
        both = ",".join([*self.batch, *self.queued])  # vLLM fills both label values from one dict
        labels = f'engine="0",model_name="{MODEL}"'
        in_batch = sum(self.batch.values())
        seen = sorted(set(self.seen_models))
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{labels}}} {in_batch}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{{labels}}} {len(self.queued)}\n"
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
            f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{{labels}}} 0.25\n"
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            f"# TYPE vllm:cache_config_info gauge\n{CACHE_CONFIG}"
            "# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\n"
            f'vllm:lora_requests_info{{max_lora="{self.slots}",running_lora_adapters="{running}",'
            f'waiting_lora_adapters="{both}"}} {time.time()}\n'
            # A family naming upstream adapters (none in vLLM 0.32; a later one may): `@` samples must not pass.
            "# HELP vllm:lora_request_success_total Finished requests by upstream adapter (fake).\n"
            "# TYPE vllm:lora_request_success_total counter\n"
            + "".join(f'vllm:lora_request_success_total{{lora_name="{m}"}} 1.0\n' for m in seen)
        )
        return web.Response(text=text, content_type="text/plain")
