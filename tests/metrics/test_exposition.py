"""/metrics of the whole app in front of the fake engine: parseable, documented, well named, bounded labels,
engine families re-exported per engine, and still answering when the engine is down."""

from __future__ import annotations

import asyncio
import re
import threading
import time

from aiohttp import web
from prometheus_client.metrics_core import Metric

from governor.bench.fake_engine import FakeEngine
from governor.metrics.gateway import OTHER
from governor.metrics.model_server import REPLACED
from tests.api.conftest import ADMIN, GatewayFactory, chat_body, gateway  # noqa: F401
from tests.metrics.traffic import ADAPTER, exercise, families, scrape

GATEWAY = {
    "governor_requests": "counter", "governor_requests_in_flight": "gauge",
    "governor_request_duration_seconds": "histogram", "governor_time_to_first_token_seconds": "histogram",
    "governor_prompt_tokens": "counter", "governor_output_tokens": "counter", "governor_loops_detected": "counter",
}  # fmt: skip
ADAPTERS = {
    "governor_adapters": "gauge", "governor_adapter_loads": "counter", "governor_adapter_unloads": "counter",
    "governor_adapter_evictions": "counter", "governor_adapter_load_seconds": "histogram",
}  # fmt: skip
ENGINE = {
    "governor_engine_up": "gauge", "governor_engine_restarts": "counter",
    "governor_engine_outstanding_requests": "gauge",
}  # fmt: skip
GPU = {"governor_gpu_available": "gauge", "governor_gpu_output_tokens_per_joule": "gauge"}

# What vLLM 0.32 writes: every sample carries its own `engine` (data-parallel index), counters and
# histograms have `_created` series, and process/python families sit beside the vllm:* ones.
VLLM_TEXT = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="fake-model"} 3.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="fake-model"} 42.0
vllm:generation_tokens_created{engine="0",model_name="fake-model"} 1.7e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="fake-model"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="fake-model"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="fake-model"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="fake-model"} 0.5
vllm:time_to_first_token_seconds_created{engine="0",model_name="fake-model"} 1.7e+09
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7e+09
"""


class VllmLikeEngine(FakeEngine):
    """The fake engine serving vLLM's own /metrics shape."""

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=VLLM_TEXT, content_type="text/plain")


# One line of the text format: HELP, TYPE, or a sample `name{labels} value` with a number for the value.
EXPOSITION_LINE = re.compile(
    r"# HELP [a-zA-Z_:][\w:]* .*|# TYPE [a-zA-Z_:][\w:]* (counter|gauge|histogram|summary|untyped)"
    r'|[a-zA-Z_:][\w:]*(\{([a-zA-Z_]\w*="([^"\\\n]|\\.)*",?)*\})? '
    r"([-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|Inf)|NaN)( -?\d+)?"
)


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def label_values(family: Metric, label: str, suffix: str = "") -> set[str]:
    return {s.labels[label] for s in family.samples if s.name.endswith(suffix) and label in s.labels}


def check_well_formed(text: str) -> dict[str, Metric]:
    """Parses; every family has TYPE and HELP; counters end in _total; no `_created` series."""
    found = families(text)
    helps = set(re.findall(r"^# HELP (\S+) ", text, re.M))
    types = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    assert types and {name for name, _ in types} <= helps, "a family without HELP"
    for name, kind in types:
        if kind == "counter":
            assert name.endswith("_total"), name
    for family in found.values():
        assert family.type != "unknown", f"{family.name} has no TYPE"
        assert family.documentation.strip(), f"{family.name} has no HELP text"
        for sample in family.samples:
            assert not sample.name.endswith("_created"), sample
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample
    return found


def sample_value(family: Metric, **labels: str) -> float:
    matching = [s.value for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (family.name, labels, family.samples)
    return matching[0]


async def test_exposition_after_traffic(gateway: GatewayFactory) -> None:  # noqa: F811
    gw = await gateway(admin_key=ADMIN)
    await exercise(gw)
    found = check_well_formed(await scrape(gw))
    for expected in (GATEWAY, ADAPTERS, ENGINE, GPU):
        for name, kind in expected.items():
            assert name in found, name
            assert found[name].type == kind, (name, found[name].type)
    requests = found["governor_requests"]
    assert label_values(requests, "model") == {"fake-model", ADAPTER, OTHER}
    assert sample_value(requests, model=OTHER, endpoint="chat", status="404") == 1
    assert sample_value(requests, model=ADAPTER, endpoint="chat", status="200") == 2
    assert label_values(found["governor_time_to_first_token_seconds"], "model", "_bucket") == {"fake-model", ADAPTER}
    assert sample_value(found["governor_output_tokens"], model="fake-model") > 0
    assert sample_value(found["governor_adapters"], state="ready") == 1
    assert sample_value(found["governor_adapter_loads"], result="ok") == 1
    assert sample_value(found["governor_engine_up"], engine="fake-0") == 1
    assert sample_value(found["governor_gpu_available"]) == (1.0 if gpu_count() else 0.0)
    running = found["vllm:num_requests_running"]
    assert running.type == "gauge" and running.documentation
    assert [s.labels for s in running.samples] == [{"engine": "fake-0", "model_name": "fake-model"}]


async def test_vllm_engine_label_is_renamed(gateway: GatewayFactory) -> None:  # noqa: F811
    gw = await gateway(fake=VllmLikeEngine())
    await gw.client.post("/v1/chat/completions", json=chat_body())
    text = await scrape(gw)
    found = check_well_formed(text)
    assert "python_gc_objects_collected" not in found, "engine process metrics must not collide with the gateway's"
    vllm_lines = [line for line in text.splitlines() if line.startswith("vllm:")]
    for line in vllm_lines:
        assert len(re.findall(r'[{,]engine="', line)) <= 1, line
    # Re-exported: all but the two `_created` series and the families Governor exports itself (model_server.py).
    reexported = [line for line in vllm_lines if re.split(r"[{ ]", line, maxsplit=1)[0] not in REPLACED]
    assert len(reexported) == 5, reexported
    engine_view = found["governor_engine_num_requests_running"].samples  # vLLM's own count, renamed
    assert [(s.labels, s.value) for s in engine_view] == [
        ({"engine": "fake-0", "vllm_engine": "0", "model_name": "fake-model"}, 3.0)
    ]
    assert all(len(re.findall(r'[{,]engine="', line)) == 1 for line in reexported), reexported
    running = found["vllm:num_requests_running"].samples
    assert [s.labels for s in running] == [{"engine": "fake-0", "model_name": "fake-model"}], running
    for name in ("vllm:generation_tokens", "vllm:time_to_first_token_seconds"):
        for sample in found[name].samples:
            assert sample.labels["engine"] == "fake-0" and sample.labels["vllm_engine"] == "0", sample
            assert sample.labels["model_name"] == "fake-model", sample
    assert found["vllm:generation_tokens"].type == "counter"
    assert sample_value(found["vllm:generation_tokens"]) == 42
    buckets = [s for s in found["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["le"] for s in buckets} == {"0.1", "+Inf"}
    info = found["vllm:lora_requests_info"].samples  # Governor's own, with vLLM's labels and nothing more
    assert [s.labels for s in info] == [{"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}]


async def test_model_label_stays_bounded(gateway: GatewayFactory) -> None:  # noqa: F811
    gw = await gateway()

    async def ask(model: str) -> int:
        r = await gw.client.post("/v1/chat/completions", json=chat_body(model=model, max_tokens=1))
        return r.status_code

    for start in range(0, 1000, 50):
        codes = await asyncio.gather(*(ask(f"bogus-{i}") for i in range(start, start + 50)))
        assert set(codes) == {404}
    assert await asyncio.gather(*(ask("fake-model") for _ in range(3))) == [200, 200, 200]
    found = check_well_formed(await scrape(gw))
    requests = found["governor_requests"]
    models = label_values(requests, "model")
    assert models == {"fake-model", OTHER} and len(models) <= 3
    assert sample_value(requests, model=OTHER, endpoint="chat", status="404") == 1000
    for name in ("governor_request_duration_seconds", "governor_time_to_first_token_seconds",
                 "governor_output_tokens", "governor_prompt_tokens"):  # fmt: skip
        assert label_values(found[name], "model") <= {"fake-model", OTHER}, name


async def test_metrics_answer_when_the_engine_is_down(gateway: GatewayFactory) -> None:  # noqa: F811
    gw = await gateway()
    await gw.client.post("/v1/chat/completions", json=chat_body())
    assert "vllm:num_requests_running" in families(await scrape(gw))
    await gw.stop_engine()
    deadline = time.monotonic() + 15
    while True:
        found = check_well_formed(await scrape(gw))
        # Governor's own model-server families stay (they are its request state); the engine's copy goes.
        engine_series = [name for name in found if name.startswith("vllm:") and name not in REPLACED]
        if sample_value(found["governor_engine_up"], engine="fake-0") == 0 and not engine_series:
            break  # the copy of its metrics goes at the next background refresh (1 s)
        assert time.monotonic() < deadline, "the gateway did not notice the engine went down"
        await asyncio.sleep(0.1)
    r = await gw.client.get("/metrics")
    assert r.status_code == 200
    assert not [name for name in families(r.text) if name.startswith("vllm:") and name not in REPLACED]
    gone = {"vllm:kv_cache_usage_perc", "vllm:cache_config_info", "governor_engine_num_requests_running"}
    assert not gone & set(families(r.text)), "read off the engine's copy, which is gone"
    # Nothing but exposition lines: no error text from the failed engine fetch slipped into the body.
    for line in r.text.rstrip("\n").split("\n"):
        assert EXPOSITION_LINE.fullmatch(line), line
    assert sample_value(found["governor_gpu_available"]) in (0.0, 1.0)


def gpu_readers() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("governor-gpu-reader-"))


async def test_gpu_reader_runs_from_startup_not_from_the_first_scrape(gateway: GatewayFactory) -> None:  # noqa: F811
    """The H200 run's first scrape found no reading: the reader only started with it. The app starts it."""
    before = gpu_readers()
    await gateway()  # startup (lifespan) only: no request, no scrape
    assert gpu_readers() == before + 1
