"""deploy/k8s/overlays/inference-pool rendered with `kubectl kustomize` and validated offline (CRDs against
deploy/k8s/schemas), then what schemas cannot see: the pool selects Governor's pods on the port Governor
listens on, probes hit the app's routes, the picker and the route reference what is rendered, adapters are
on a read-only shared volume, and the picker's config names only metrics Governor exports (checked against
a real /metrics of the gateway in front of a vLLM-shaped fake engine)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.api.conftest import ADMIN, GatewayFactory, gateway  # noqa: F401
from tests.metrics import epp
from tests.metrics.slot_engine import SlotEngine

from .repo_facts import ops_paths, unknown_settings
from .test_k8s import K8S, NAMESPACE, render, validate_offline

OVERLAY = K8S / "overlays" / "inference-pool"
SCORERS = {"queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer", "prefix-cache-scorer"}
SPECS = ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec", "cacheInfoSpec")


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render(OVERLAY)


def named(docs: list[dict], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def governor(docs: list[dict]) -> dict[str, Any]:
    return named(docs, "Deployment", "governor")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(c)


def env(docs: list[dict]) -> dict[str, str]:
    out: dict[str, str] = {}
    for source in container(governor(docs))["envFrom"]:
        if "configMapRef" in source:
            out |= named(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    return out


def epp_config(docs: list[dict]) -> dict[str, Any]:
    """The picker's config file, found the way the picker finds it: --config-file in the mounted ConfigMap."""
    deployment = named(docs, "Deployment", "governor-epp")
    c = container(deployment)
    path = c["args"][c["args"].index("--config-file") + 1]
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    data = named(docs, "ConfigMap", volume["configMap"]["name"])["data"]
    return dict(yaml.safe_load(data[path.removeprefix(mount["mountPath"] + "/")]))


def test_overlay_renders_and_validates_offline(docs: list[dict]) -> None:
    validate_offline("overlays/inference-pool", docs)
    kinds = {d["kind"] for d in docs}
    assert {"InferencePool", "InferenceObjective", "HTTPRoute", "Gateway", "Deployment", "Service"} <= kinds
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} has no namespace"


def test_pool_selects_governor_pods_on_the_port_it_listens_on(docs: list[dict]) -> None:
    pool = named(docs, "InferencePool")
    selector = pool["spec"]["selector"]["matchLabels"]
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selected = all(labels.get(k) == v for k, v in selector.items())
        assert selected == (deployment["metadata"]["name"] == "governor"), deployment["metadata"]["name"]
    settings = env(docs)
    ports = {p["name"]: p["containerPort"] for p in container(governor(docs))["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [int(settings["GOVERNOR_PORT"])] == [ports["http"]]
    labels = governor(docs)["spec"]["template"]["metadata"]["labels"]
    assert labels["inference.networking.k8s.io/engine-type"] == epp_config(docs)["plugins"][-1]["parameters"][
        "defaultEngine"
    ] == "vllm"  # fmt: skip


def test_governor_probes_settings_and_one_engine_per_pod(docs: list[dict]) -> None:
    c = container(governor(docs))
    settings = env(docs)
    assert not unknown_settings(settings), unknown_settings(settings)
    assert settings["GOVERNOR_ENGINES"] == "1" and settings["GOVERNOR_METRICS_AUTH"] == "false"
    routes = ops_paths()
    for probe, path in {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in routes and get["port"] == "http", probe


def test_picker_is_wired_to_the_pool(docs: list[dict]) -> None:
    pool = named(docs, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    service = named(docs, "Service", ref["name"])
    picker = named(docs, "Deployment", "governor-epp")
    c = container(picker)
    assert ref["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}[grpc["targetPort"]] == ref["port"]["number"]
    pod_labels = picker["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert c["args"][c["args"].index("--pool-name") + 1] == pool["metadata"]["name"]
    assert c["image"].startswith("registry.k8s.io/gateway-api-inference-extension/epp:v")
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"][0]["name"] == picker["spec"]["template"]["spec"]["serviceAccountName"]
    rules = named(docs, "Role", binding["roleRef"]["name"])["rules"]
    assert any("inferencepools" in r["resources"] for r in rules) and any("pods" in r["resources"] for r in rules)


def test_route_and_objective_reference_the_pool(docs: list[dict]) -> None:
    pool = named(docs, "InferencePool")["metadata"]["name"]
    route = named(docs, "HTTPRoute")
    (parent,) = route["spec"]["parentRefs"]
    named(docs, "Gateway", parent["name"])
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool}]
    assert named(docs, "InferenceObjective")["spec"]["poolRef"]["name"] == pool


def test_adapters_are_a_shared_read_only_volume(docs: list[dict]) -> None:
    deployment = governor(docs)
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "adapters"]
    claim = named(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    (mount,) = [m for m in container(deployment)["volumeMounts"] if m["name"] == "adapters"]
    assert mount["readOnly"] is True and mount["mountPath"] == env(docs)["GOVERNOR_ADAPTERS_DIR"]


def test_picker_config_has_the_scorers_and_the_vllm_mapping(docs: list[dict]) -> None:
    config = epp_config(docs)
    assert config["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in config["plugins"]}
    assert SCORERS | {"metrics-data-source", "core-metrics-extractor"} <= types
    (profile,) = config["schedulingProfiles"]
    assert {p["pluginRef"] for p in profile["plugins"]} == SCORERS
    (source,) = config["dataLayer"]["sources"]
    assert source["pluginRef"] == "metrics-data-source"
    assert [e["pluginRef"] for e in source["extractors"]] == ["core-metrics-extractor"]
    metrics = next(p for p in config["plugins"] if p["type"] == "metrics-data-source")["parameters"]
    assert metrics["path"] in ops_paths()


async def test_picker_config_names_only_metrics_governor_exports(gateway: GatewayFactory, docs: list[dict]) -> None:  # noqa: F811
    (extractor,) = [p for p in epp_config(docs)["plugins"] if p["type"] == "core-metrics-extractor"]
    (vllm,) = [e for e in extractor["parameters"]["engineConfigs"] if e["name"] == "vllm"]
    mapping = {key: vllm[key] for key in SPECS}
    assert mapping == epp.VLLM, "the spelled-out mapping is the EPP's own vLLM default"
    gw = await gateway(fake=SlotEngine(), admin_key=ADMIN)
    r = await gw.client.get("/metrics")
    assert r.status_code == 200
    families = epp.parse(r.text)
    for key, text in mapping.items():
        spec = epp.Spec.parse(text)
        assert spec.name in families, f"{key}: {spec.name} is not in Governor's /metrics"
        assert [s for s in families[spec.name] if all(s.labels.get(k) == v for k, v in spec.labels.items())], key
    seen = epp.read(r.text, mapping)
    assert seen.max_active_models == gw.settings.max_loras and seen.cache_block_size == 16


# -- what the public Gateway exposes (issue 28, finding 7) ------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels") or {}
    assert not selector.get("matchExpressions"), "only matchLabels are checked here"
    return all(labels.get(k) == v for k, v in match.items())


def _routed(route: dict[str, Any], path: str) -> bool:
    """Whether an HTTPRoute sends `path` anywhere (Gateway API path semantics; a rule without matches is `/`)."""
    for rule in route["spec"]["rules"]:
        for match in rule.get("matches") or [{}]:
            path_match = match.get("path") or {}
            kind, value = path_match.get("type", "PathPrefix"), path_match.get("value", "/")
            if kind == "RegularExpression":
                return True  # not checked: counted as routing everything
            prefix = value.rstrip("/")
            if path == value or (kind == "PathPrefix" and path.startswith(prefix + "/")):
                return True
    return False


def test_the_gateway_listens_on_https_only_with_a_certificate(docs: list[dict]) -> None:
    listeners = named(docs, "Gateway")["spec"]["listeners"]
    assert listeners
    for listener in listeners:  # no plain-HTTP listener: an API key must never cross the network in clear
        assert listener["protocol"] == "HTTPS" and listener["port"] == 443, listener
        tls = listener["tls"]
        assert tls.get("mode", "Terminate") == "Terminate"
        (ref,) = tls["certificateRefs"]
        assert ref.get("kind", "Secret") == "Secret" and ref["name"]


def test_the_public_route_serves_the_openai_api_and_not_admin(docs: list[dict]) -> None:
    routes = [d for d in docs if d["kind"] == "HTTPRoute"]
    for route in routes:
        for path in ("/admin", "/admin/adapters", "/admin/adapters/x/pin", "/metrics", "/", "/health"):
            assert not _routed(route, path), f"{route['metadata']['name']} routes {path}"
    (route,) = routes
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/my-adapter"):
        assert _routed(route, path), path


def test_only_the_gateway_the_picker_and_prometheus_reach_governor_pods(docs: list[dict]) -> None:
    pods = governor(docs)["spec"]["template"]["metadata"]["labels"]
    picker = named(docs, "Deployment", "governor-epp")["spec"]["template"]["metadata"]["labels"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and _selects(d["spec"]["podSelector"], pods)]
    assert not _selects(policy["spec"]["podSelector"], picker)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    proxies = {"gateway.networking.k8s.io/gateway-name": named(docs, "Gateway")["metadata"]["name"]}
    seen = set()
    for peer in rule["from"]:
        labels = peer["podSelector"]["matchLabels"]  # a peer is always some pods, never "everything"
        assert labels
        if "namespaceSelector" in peer:  # Prometheus, which the ServiceMonitor and KEDA's trigger rely on
            assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
            assert labels == {"app.kubernetes.io/name": "prometheus"}
            seen.add("prometheus")
        elif labels == proxies:
            seen.add("gateway")
        else:
            assert _selects(peer["podSelector"], picker), peer
            seen.add("picker")
    assert seen == {"gateway", "picker", "prometheus"}
