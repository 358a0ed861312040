"""The model-server series on their own: request states, the engines' KV-cache copies, several engines
folded into the one series per pod the endpoint picker reads, and the re-export's renames."""

from __future__ import annotations

from governor.metrics.engine import merge
from governor.metrics.model_server import RENAMED, REPLACED, EngineCache, Flights, ModelServerSeries
from tests.metrics import epp

ENGINE_TEXT = """\
# HELP vllm:kv_cache_usage_perc KV-cache usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} {usage}
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="{blocks}"} 1.0
"""


def engine_text(usage: float, blocks: int) -> str:
    return ENGINE_TEXT.replace("{usage}", str(usage)).replace("{blocks}", str(blocks))


def test_flights_count_each_request_once_whatever_order_the_calls_come_in() -> None:
    flights = Flights()
    a1, a2, base = flights.admit("a"), flights.admit("a"), flights.admit(None)
    assert (flights.waiting, flights.running) == (3, 0) and flights.lora_sets() == ([], ["a"])
    a1.started()
    a1.started()  # a second first token (another choice) changes nothing
    assert (flights.waiting, flights.running) == (2, 1) and flights.lora_sets() == (["a"], ["a"])
    a2.end()  # ended before its first token (a 429, a client that left)
    a2.started()
    a2.end()
    base.started()
    assert (flights.waiting, flights.running) == (0, 2) and flights.lora_sets() == (["a"], [])
    a1.end()
    base.end()
    assert (flights.waiting, flights.running) == (0, 0) and flights.lora_sets() == ([], [])
    flights.forget(set())
    assert flights.adapters == {}


def test_several_engines_are_one_series_per_pod() -> None:
    flights = Flights()
    flights.admit("b").started()
    flights.admit("a")
    series = ModelServerSeries(flights, lambda: "m", 4, lambda: [("b", True, False), ("a", True, True)])
    caches = [EngineCache.parse(engine_text(0.5, 1000)), EngineCache.parse(engine_text(0.2, 3000)), None]
    text = series.render(["engine-0", "engine-1", "engine-2"], caches)
    seen = epp.read(text)
    assert (seen.waiting_queue_size, seen.running_requests_size) == (1, 1)
    assert seen.kv_cache_usage_percent == (0.5 * 1000 + 0.2 * 3000) / 4000  # blocks in use / blocks
    assert (seen.cache_block_size, seen.cache_num_blocks) == (16, 4000)
    assert seen.active_models == {"b"} and seen.waiting_models == {"a"} and seen.max_active_models == 4
    families = epp.parse(text)
    for name in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:cache_config_info"):
        assert [s.labels["engine"] for s in families[name]] == ["all"], name
    assert [(s.labels, s.value) for s in families["governor_adapter_loaded"]] == [
        ({"adapter": "a", "pinned": "true", "tier": "engine"}, 1.0),
        ({"adapter": "b", "pinned": "false", "tier": "engine"}, 1.0),
    ]


def test_requests_waiting_for_an_adapter_to_load_are_waiting_for_the_picker() -> None:
    flights = Flights()
    flights.admit("b").started()
    series = ModelServerSeries(flights, lambda: "m", 4, lambda: [("b", True, False), ("c", False, False)],
                               lambda: {"c": 3})  # fmt: skip
    text = series.render(["engine-0"], [EngineCache.parse(engine_text(0.5, 1000))])
    seen = epp.read(text)
    assert (seen.waiting_queue_size, seen.running_requests_size) == (3, 1)
    assert seen.active_models == {"b"} and seen.waiting_models == {"c"}
    loaded = {s.labels["adapter"]: (s.labels["tier"], s.value) for s in epp.parse(text)["governor_adapter_loaded"]}
    assert loaded == {"b": ("engine", 1.0), "c": ("registry", 0.0)}


def test_one_engine_keeps_its_name_and_no_copy_means_no_kv_series() -> None:
    series = ModelServerSeries(Flights(), lambda: "m", None)
    text = series.render(["engine-0"], [None])
    families = epp.parse(text)
    assert families["vllm:num_requests_running"][0].labels == {"engine": "engine-0", "model_name": "m"}
    assert "vllm:kv_cache_usage_perc" not in families and "vllm:cache_config_info" not in families
    assert "vllm:lora_requests_info" not in families  # LoRA off: like vLLM without a lora_config


def test_reexport_renames_the_engines_scheduler_view_and_drops_the_rest() -> None:
    text = (
        "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        "# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\n"
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a@2",waiting_lora_adapters=""} 1.0\n'
        + engine_text(0.5, 10)
    )
    merged = merge([("engine-0", text), ("engine-1", text)], REPLACED, RENAMED)
    families = epp.parse(merged)
    assert set(families) == {"governor_engine_num_requests_running", "governor_engine_kv_cache_usage_perc"}
    running = families["governor_engine_num_requests_running"]
    assert [(s.labels["engine"], s.labels["vllm_engine"], s.value) for s in running] == [
        ("engine-0", "0", 2.0), ("engine-1", "0", 2.0)
    ]  # fmt: skip
    assert "@" not in merged
