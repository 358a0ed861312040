"""The Grafana dashboard and the Prometheus alert rules in deploy/: structure, and every metric they query
is really exported (governor_* by a /metrics scrape of the app, vllm:* by vLLM's own metric definitions)."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.api.conftest import ADMIN, GatewayFactory, gateway  # noqa: F401
from tests.metrics.traffic import SUFFIXES, exercise, families, scrape, series_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "governor.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
SEVERITIES = {"critical", "warning", "info"}
# vLLM files that define Prometheus metrics (the v1 stat logger, perf counters, spec decode).
VLLM_SOURCES = ("v1/metrics/loggers.py", "v1/metrics/perf.py", "v1/spec_decode/metrics.py")
_VLLM_DEF = re.compile(r'_(counter|gauge|histogram)_cls\(\s*name="(vllm:[\w:]+)"')
# Info metrics (vllm:cache_config_info) are gauges named in log_metrics_info before the _gauge_cls call.
_VLLM_INFO = re.compile(r'name = "(vllm:\w+_info)"')
_DURATION = re.compile(r"^\d+[smhdwy]$")

# PromQL words that look like metric names but are not: keywords and operators (functions are
# recognised by the "(" after them, label names by where they stand).
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
             "inf", "nan"}  # fmt: skip
_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects: strings, matchers, ranges and label lists removed first,
    then every identifier that is not a function call or a keyword."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LIST.sub("", text)
    return {m.group(1) for m in _IDENT.finditer(text) if not m.group(2) and m.group(1).lower() not in _KEYWORDS}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def all_exprs() -> dict[str, str]:
    """Every query in the dashboard (panels, annotations, variables) and the alert rules, by where it is."""
    board = dashboard()
    exprs: dict[str, str] = {}
    for panel in panels(board):
        for target in panel.get("targets", []):
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            exprs[f"annotation {annotation['name']!r}"] = annotation["expr"]
    for var in board["templating"]["list"]:
        match = _LABEL_VALUES.match(var["query"]["query"])
        assert match, var
        if match.group("selector"):
            exprs[f"variable {var['name']!r}"] = match.group("selector")
    for rule in rules():
        exprs[f"alert {rule['alert']}"] = rule["expr"]
    return exprs


def vllm_series() -> set[str]:
    """Series names vLLM's metric definitions expose, read from its source (no engine runs here)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    package = Path(spec.origin).parent
    names: set[str] = set()
    for relative in VLLM_SOURCES:
        source = package / relative
        if source.is_file():
            text = source.read_text()
            for kind, name in _VLLM_DEF.findall(text):
                base = name.removesuffix("_total") if kind == "counter" else name
                names.update(base + suffix for suffix in SUFFIXES[kind])
            names.update(_VLLM_INFO.findall(text))
    assert "vllm:num_requests_waiting" in names, "vLLM's metric definitions moved; update VLLM_SOURCES"
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(governor_x_bucket{model=~"$model", le!="1"}[5m])))'
        " / on (model) group_left (engine) max without (instance) (vllm:y offset 5m) > bool 1e3"
        " and sum(rate(z_total[$__rate_interval])) by (job) unless max_over_time(deriv(v[5m])[10m:30s])"
        ' or label_replace(w, "a", "b", "c", "d")'
    )
    assert metric_names(expr) == {"governor_x_bucket", "vllm:y", "z_total", "v", "w"}


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == "governor" and board["title"]
    assert board["schemaVersion"] >= 39
    all_panels = list(panels(board))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
    for var in board["templating"]["list"]:
        assert var["datasource"] == DATASOURCE, var["name"]
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"] == DATASOURCE, annotation["name"]


def test_dashboard_covers_the_operator_questions() -> None:
    """The panels the runbook points at exist (one series each, however the queries are phrased)."""
    used = set().union(*(metric_names(e) for e in all_exprs().values()))
    wanted = {
        "governor_requests_total", "governor_output_tokens_total", "vllm:generation_tokens_total",
        "governor_time_to_first_token_seconds_bucket", "vllm:request_time_per_output_token_seconds_bucket",
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "governor_loops_detected_total", "governor_adapters", "governor_adapter_loads_total",
        "governor_adapter_evictions_total", "governor_adapter_load_seconds_bucket", "governor_engine_up",
        "governor_engine_restarts_total", "governor_gpu_utilization_ratio", "governor_gpu_memory_used_bytes",
        "governor_gpu_temperature_celsius", "governor_gpu_power_watts", "governor_gpu_output_tokens_per_joule",
    }  # fmt: skip
    assert wanted <= used, wanted - used


def test_alert_rules_structure() -> None:
    names = []
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        names.append(rule["alert"])
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule["alert"]
        assert _DURATION.match(str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]
    assert len(names) == len(set(names))
    for required in ("GovernorEngineDown", "GovernorEngineQueueGrowing", "GovernorGpuHot", "GovernorLoopRateSpike",
                     "GovernorAdapterLoadFailures", "GovernorHigh5xxRate", "GovernorHigh429Rate"):  # fmt: skip
        assert required in names


@pytest.mark.parametrize("where", ["dashboard", "alerts"])
def test_queries_are_balanced(where: str) -> None:
    """A cheap syntax guard (promtool is not a test dependency): brackets pair up, strings close."""
    for name, expr in all_exprs().items():
        if name.startswith("alert") != (where == "alerts"):
            continue
        text = _STRING.sub('""', expr)
        assert text.count('"') % 2 == 0, name
        stack: list[str] = []
        for char in text:
            if char in "([{":
                stack.append({"(": ")", "[": "]", "{": "}"}[char])
            elif char in ")]}":
                assert stack and stack.pop() == char, name
        assert not stack, name


async def test_every_queried_metric_is_exported(gateway: GatewayFactory) -> None:  # noqa: F811
    gw = await gateway(admin_key=ADMIN)
    await exercise(gw)
    governor = series_names(families(await scrape(gw)))
    vllm = vllm_series()
    missing = {}
    for where, expr in all_exprs().items():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            known = vllm if name.startswith("vllm:") else governor
            assert name.startswith(("governor_", "vllm:")), f"{where}: {name} is neither governor_* nor vllm:*"
            if name not in known:
                missing[name] = where
    assert not missing, missing
