"""Reads a /metrics exposition the way the inference endpoint picker (EPP) reads a vLLM-type model server.

Mirrors gateway-api-inference-extension v1.5.0, pkg/epp/framework/plugins/datalayer/extractor/metrics/
(factories.go: the "vllm" engine config; spec.go: getLatestMetric; loraspec.go: the LoRA rule;
extractor.go: which labels fill which field), and its text parser's refusal of a family that appears
twice. A family the spec names but the exposition lacks is an error there (the field is not updated);
here it raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# factories.go, defaultEngineConfigs[0] ("vllm").
VLLM = {
    "queuedRequestsSpec": "vllm:num_requests_waiting",
    "runningRequestsSpec": "vllm:num_requests_running",
    "kvUsageSpec": "vllm:kv_cache_usage_perc",
    "loraSpec": "vllm:lora_requests_info",
    "cacheInfoSpec": "vllm:cache_config_info",
}
_SPEC = re.compile(r"\s*([a-zA-Z_:][\w:]*)\s*(?:\{([^}]*)\})?\s*")


class NotReadable(AssertionError):
    """What the EPP would log as an extraction error."""


@dataclass
class Spec:
    name: str
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Spec:
        """`name` or `name{label=value,...}` (values quoted or not), as spec.go accepts them."""
        m = _SPEC.fullmatch(text)
        if m is None:
            raise ValueError(f"not a metric spec: {text!r}")
        labels = {}
        for pair in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
            key, _, value = pair.partition("=")
            labels[key.strip()] = value.strip().strip('"')
        return cls(m.group(1), labels)


@dataclass
class EndpointMetrics:
    """The fields of the EPP's per-endpoint Metrics that a vLLM-type server fills."""

    waiting_queue_size: int
    running_requests_size: int
    kv_cache_usage_percent: float
    active_models: set[str]
    waiting_models: set[str]
    max_active_models: int
    cache_block_size: int
    cache_num_blocks: int


def parse(text: str) -> dict[str, list[Sample]]:
    """Samples by family name; a family whose TYPE appears twice (or split in two) is refused, as expfmt does."""
    types = re.findall(r"^# TYPE (\S+) ", text, re.M)
    twice = {name for name in types if types.count(name) > 1}
    if twice:
        raise NotReadable(f"families declared twice: {sorted(twice)}")
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        if name in out:
            raise NotReadable(f"family {name} split in two")
        out[name] = list(family.samples)
    return out


def _family(families: dict[str, list[Sample]], spec: Spec) -> list[Sample]:
    samples = families.get(spec.name)
    if not samples:
        raise NotReadable(f"metric family {spec.name!r} not found")
    return [s for s in samples if all(s.labels.get(k) == v for k, v in spec.labels.items())]


def latest(families: dict[str, list[Sample]], spec: Spec) -> Sample:
    """spec.go getLatestMetric: the matching sample with the highest timestamp (unset = 0; first wins ties)."""
    best, recent = None, -1.0
    for sample in _family(families, spec):
        ts = float(sample.timestamp or 0) * 1000
        if ts > recent:
            best, recent = sample, ts
    if best is None:
        raise NotReadable(f"no matching metric for {spec}")
    return best


def latest_lora(families: dict[str, list[Sample]], spec: Spec) -> Sample:
    """loraspec.go: each label permutation is its own series whose value is a timestamp; the highest wins."""
    best, recent = None, -1.0
    for sample in _family(families, spec):
        if sample.value > recent:
            best, recent = sample, sample.value
    if best is None:
        raise NotReadable(f"no matching lora metric for {spec}")
    return best


def _names(csv: str) -> set[str]:
    return {name.strip() for name in csv.split(",") if name.strip()}


def read(text: str, mapping: dict[str, str] = VLLM) -> EndpointMetrics:
    """extractor.go Extract with the given engine config."""
    families = parse(text)
    queued = latest(families, Spec.parse(mapping["queuedRequestsSpec"]))
    running = latest(families, Spec.parse(mapping["runningRequestsSpec"]))
    kv = latest(families, Spec.parse(mapping["kvUsageSpec"]))
    lora = latest_lora(families, Spec.parse(mapping["loraSpec"])).labels
    cache = latest(families, Spec.parse(mapping["cacheInfoSpec"])).labels
    return EndpointMetrics(
        waiting_queue_size=int(queued.value),
        running_requests_size=int(running.value),
        kv_cache_usage_percent=kv.value,
        active_models=_names(lora.get("running_lora_adapters", "")),
        waiting_models=_names(lora.get("waiting_lora_adapters", "")),
        max_active_models=int(lora["max_lora"]) if lora.get("max_lora") else 0,
        cache_block_size=int(cache.get("block_size") or 0),
        cache_num_blocks=int(cache.get("num_gpu_blocks") or 0),
    )


def label_values(text: str) -> set[str]:
    """Every label value of every sample in the exposition."""
    return {value for samples in parse(text).values() for s in samples for value in s.labels.values()}
