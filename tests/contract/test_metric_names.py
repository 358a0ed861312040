"""Every vllm:* series the dashboard, the alert rules and the autoscalers query exists in this vLLM."""

from __future__ import annotations

import re

from tests.contract import vllm_under_test as vut
from tests.metrics.test_dashboards import ROOT, all_exprs, metric_names, vllm_series

# KEDA / prometheus-adapter queries in the Kubernetes manifests (plain YAML strings, not parsed PromQL).
_K8S_NAME = re.compile(r"vllm:[a-z_]+")


def queried_vllm_names() -> dict[str, str]:
    """vllm:* series name -> where it is queried."""
    names = {}
    for where, expr in all_exprs().items():
        for name in metric_names(expr):
            if name.startswith("vllm:"):
                names[name] = where
    for path in sorted((ROOT / "deploy" / "k8s").rglob("*.yaml")):
        for name in _K8S_NAME.findall(path.read_text()):
            names.setdefault(name, str(path.relative_to(ROOT)))
    return names


def test_queried_vllm_metrics_exist_in_this_version() -> None:
    queried = queried_vllm_names()
    assert "vllm:num_requests_waiting" in queried and "vllm:kv_cache_usage_perc" in queried
    defined = vllm_series()  # read from this version's own metric definitions (v1/metrics/loggers.py, ...)
    missing = {name: where for name, where in queried.items() if name not in defined}
    assert not missing, f"not defined by vLLM {vut.VERSION}: {missing}"


def test_a_renamed_metric_would_be_caught() -> None:
    # vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc; the old name must not pass as defined.
    assert "vllm:gpu_cache_usage_perc" not in vllm_series()
