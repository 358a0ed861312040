"""/metrics after real requests through the real engine: it parses, and holds gateway, adapter, engine
and GPU families; every vllm:* series the dashboard and alerts query is really exported by the engine."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Live
from tests.metrics.test_dashboards import all_exprs, metric_names

pytestmark = pytest.mark.engine


def test_metrics_after_real_traffic(live: Live) -> None:
    for stream in (False, True):
        body = {"model": live.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": stream}
        assert httpx.post(live.v1 + "/chat/completions", json=body, timeout=120).status_code == 200
    text = httpx.get(live.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("governor_requests", "governor_time_to_first_token_seconds", "governor_output_tokens",
                 "governor_adapters", "governor_adapter_loads", "governor_engine_up", "governor_gpu_available",
                 "vllm:num_requests_running", "vllm:generation_tokens"):  # fmt: skip
        assert name in families, name
        assert families[name].documentation, f"{name} has no HELP"
    engines = {s.labels.get("engine") for s in families["vllm:num_requests_running"].samples}
    assert engines == {"engine-0"}
    assert [s.value for s in families["governor_gpu_available"].samples] == [0.0]  # no GPU on CPU machines
    exported = {s.name for f in families.values() for s in f.samples}
    queried = {n for expr in all_exprs().values() for n in metric_names(expr)}
    missing = [n for n in sorted(queried) if n.startswith("vllm:") and n not in exported
               and n + "_bucket" not in exported and n + "_total" not in exported]  # fmt: skip
    assert not missing, f"dashboard/alert series the engine does not export: {missing}"
