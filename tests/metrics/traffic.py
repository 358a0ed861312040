"""Real traffic through the fake-engine gateway (base model and an adapter), and /metrics parsing helpers."""

from __future__ import annotations

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from governor.bench.fake_adapter import write_adapter
from tests.api.conftest import ADMIN, Gateway, chat_body

ADAPTER = "metrics-adapter"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
# Series suffixes each metric type is exposed with (`_created` is disabled gateway-wide).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


async def exercise(gw: Gateway, adapter: bool = True) -> None:
    """Base and adapter requests on both endpoints, streaming and not, plus one unknown model (404)."""
    client = gw.client
    if adapter:
        write_adapter(gw.settings.adapters_dir, ADAPTER)
        r = await client.post("/admin/adapters", json={"name": ADAPTER, "path": ADAPTER}, headers=ADMIN_AUTH)
        assert r.status_code == 200, r.text
    models = ["fake-model", ADAPTER] if adapter else ["fake-model"]
    for model in models:
        for stream in (False, True):
            r = await client.post(
                "/v1/chat/completions", json=chat_body(model=model, stream=stream), headers=ADMIN_AUTH
            )
            assert r.status_code == 200, r.text
        body = {"model": model, "prompt": "hi", "max_tokens": 3}
        r = await client.post("/v1/completions", json=body, headers=ADMIN_AUTH)
        assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", json=chat_body(model="no-such-model"), headers=ADMIN_AUTH)
    assert r.status_code == 404, r.text


async def scrape(gw: Gateway) -> str:
    r = await gw.client.get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


def families(text: str) -> dict[str, Metric]:
    """Families by name (prometheus_client strips `_total` from counter family names)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def series_names(found: dict[str, Metric]) -> set[str]:
    """Every series name a query may use: sample names seen, plus the ones each family's type implies."""
    names: set[str] = set()
    for family in found.values():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names
