"""The fast families render what prometheus_client would for the same updates, and parse back exactly."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from governor.metrics.families import Families
from governor.metrics.gateway import LATENCY_BUCKETS, TTFT_BUCKETS, GatewayMetrics


def parsed(text: str) -> list[tuple[str, str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]:
    out = []
    for family in text_string_to_metric_families(text):
        samples = sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples)
        out.append((family.name, family.type, family.documentation, samples))
    return sorted(out)


def test_same_exposition_as_prometheus_client_for_the_same_updates() -> None:
    disable_created_metrics()
    rng = random.Random(3)
    fast, reference = Families(), CollectorRegistry()
    labels = ("model", "endpoint")
    counter = (
        fast.counter("t_requests", "Requests.", labels),
        Counter("t_requests", "Requests.", labels, registry=reference),
    )
    gauge = (
        fast.gauge("t_in_flight", "In flight.", labels),
        Gauge("t_in_flight", "In flight.", labels, registry=reference),
    )
    histograms = [
        (fast.histogram("t_seconds", "Latency.", labels, LATENCY_BUCKETS),
         Histogram("t_seconds", "Latency.", labels, buckets=LATENCY_BUCKETS, registry=reference)),
        (fast.histogram("t_ttft", "TTFT.", labels, TTFT_BUCKETS),
         Histogram("t_ttft", "TTFT.", labels, buckets=TTFT_BUCKETS, registry=reference)),
    ]  # fmt: skip
    models = ["base", 'quo"te', "back\\slash", "new\nline", "adapter-1"]
    for _ in range(2000):
        values = (rng.choice(models), rng.choice(("chat", "completions")))
        amount = rng.choice((1.0, 2.5, 7.0))
        counter[0].labels(*values).inc(amount)
        counter[1].labels(*values).inc(amount)
        step = rng.choice((1.0, -1.0))
        gauge[0].labels(*values).inc(step)
        gauge[1].labels(*values).inc(step)
        value = rng.choice((*LATENCY_BUCKETS, *TTFT_BUCKETS, rng.random() * 700))  # exact bounds too
        for ours, theirs in histograms:
            ours.labels(*values).observe(value)
            theirs.labels(*values).observe(value)
    assert parsed(fast.render().decode()) == parsed(generate_latest(reference).decode())


def test_label_values_are_escaped_and_label_count_checked() -> None:
    fast = Families()
    requests = fast.counter("t_total_named", "Requests.", ("model",))
    requests.labels('a "quoted"\\ name\nnext').inc()
    [family] = text_string_to_metric_families(fast.render().decode())
    assert family.name == "t_total_named" and family.type == "counter"
    assert family.samples[0].labels == {"model": 'a "quoted"\\ name\nnext'}
    with pytest.raises(ValueError):
        requests.labels("a", "b")


def test_observation_on_a_bound_counts_in_that_bucket() -> None:
    fast = Families()
    hist = fast.histogram("t_seconds", "Latency.", (), (0.1, 1))
    hist.labels().observe(0.1)
    hist.labels().observe(5)
    samples = {
        (s.name, s.labels.get("le")): s.value
        for s in next(iter(text_string_to_metric_families(fast.render().decode()))).samples
    }
    assert samples[("t_seconds_bucket", "0.1")] == 1
    assert samples[("t_seconds_bucket", "1.0")] == 1
    assert samples[("t_seconds_bucket", "+Inf")] == 2
    assert samples[("t_seconds_count", None)] == 2 and samples[("t_seconds_sum", None)] == 5.1


def test_gateway_metrics_render_parses_with_every_family_documented() -> None:
    metrics = GatewayMetrics()
    metrics.requests.labels("m", "chat", "200").inc()
    metrics.output_tokens.labels("m").inc(5)
    metrics.output_tokens.labels("n").inc(2)
    found = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert found["governor_requests"].type == "counter" and found["governor_requests_in_flight"].type == "gauge"
    assert all(f.documentation for f in found.values())
    assert metrics.total_output_tokens() == 7
