"""deploy/k8s rendered with `kubectl kustomize` and validated offline: built-in kinds against the Kubernetes
OpenAPI schemas kubernetes-validate ships, CRDs (ServiceMonitor, ScaledObject) against deploy/k8s/schemas;
then the facts that schemas cannot see: probes on the app's real routes, ports, drain timing, the user."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .repo_facts import DEPLOY, DOCKERFILES, Dockerfile, ops_paths, unknown_settings

K8S = DEPLOY / "k8s"
# Oldest and newest Kubernetes minor we claim (kubectl here is 1.32); both ship with kubernetes-validate.
K8S_VERSIONS = ("1.30.0", "1.32.0")
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_v1_inferencepool.json",
    (
        "inference.networking.x-k8s.io/v1alpha2",
        "InferenceObjective",
    ): "inference.networking.x-k8s.io_v1alpha2_inferenceobjective.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_v1_httproute.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway.networking.k8s.io_v1_gateway.json",
}
NAMESPACE = "governor"
TYPICAL_REQUEST_SECONDS = 60


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: these tests render deploy/k8s with `kubectl kustomize` (v1.27+)")
    return kubectl


def render(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory}:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _variant(
    tmp: Path, resources: Sequence[Path], components: Sequence[Path] = (), patches: Sequence[Path] = ()
) -> Path:
    """A throwaway overlay: the documented optional pieces must render and validate too."""
    for patch in patches:
        shutil.copy(patch, tmp / patch.name)  # kustomize loads patch files from inside the overlay only
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        # kustomize wants relative paths to other kustomizations
        "resources": [os.path.relpath(r, tmp) for r in resources],
        "components": [os.path.relpath(c, tmp) for c in components],
        "patches": [{"path": p.name} for p in patches],
    }
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return tmp


RENDERS = ["overlays/cpu", "overlays/gpu", "gpu+tensor-parallel", "base+hpa-prometheus-adapter"]


@pytest.fixture(scope="module", params=RENDERS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    name = request.param
    if name == "gpu+tensor-parallel":
        directory = _variant(tmp_path_factory.mktemp("tp"), [K8S / "overlays/gpu"],
                             patches=[K8S / "overlays/gpu/patch-tensor-parallel.yaml"])  # fmt: skip
    elif name == "base+hpa-prometheus-adapter":
        directory = _variant(tmp_path_factory.mktemp("hpa"), [K8S / "base"],
                             components=[K8S / "components/hpa-prometheus-adapter"])  # fmt: skip
    else:
        directory = K8S / name
    return name, render(directory)


def _one(docs: list[dict], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _named(docs: list[dict], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"{kind}/{name} is referenced but not rendered"
    return found[0]


def _container(docs: list[dict]) -> dict[str, Any]:
    (container,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _config(docs: list[dict]) -> dict[str, str]:
    """The environment the container gets: its ConfigMap and Secret (envFrom), then its own env."""
    container = _container(docs)
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env |= _named(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            secret = _named(docs, "Secret", source["secretRef"]["name"])
            env |= {k: "<secret>" for k in secret.get("data", {}) | secret.get("stringData", {})}
    env |= {e["name"]: e.get("value", "") for e in container.get("env", [])}
    return env


def test_schemas_on_disk_are_valid_json_schema() -> None:
    for filename in CRD_SCHEMAS.values():
        jsonschema.Draft7Validator.check_schema(json.loads((K8S / "schemas" / filename).read_text()))


def validate_offline(name: str, docs: list[dict]) -> None:
    """Built-in kinds against kubernetes-validate's schemas, CRDs against deploy/k8s/schemas."""
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        where = f"{name}: {doc['kind']}/{doc['metadata'].get('name')}"
        if key in CRD_SCHEMAS:
            schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[key]).read_text())
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
            assert not errors, f"{where}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{where}: no schema for {key} (a CRD? add its schema to deploy/k8s/schemas)")
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where} on Kubernetes {version}: {e.message} at {list(e.path)}")


def test_every_resource_validates_offline(rendered: tuple[str, list[dict]]) -> None:
    validate_offline(*rendered)


def test_namespaced_resources_land_in_one_namespace(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} has no namespace"


def test_settings_are_real(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    env = _config(docs)
    assert not unknown_settings(env), f"unknown settings: {unknown_settings(env)}"
    assert env["GOVERNOR_HOST"] == "0.0.0.0"
    assert {"GOVERNOR_API_KEYS", "GOVERNOR_ADMIN_KEY"} <= {k for k, v in env.items() if v == "<secret>"}


def test_ports_and_probes_match_the_app(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    container = _container(docs)
    env = _config(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(env["GOVERNOR_PORT"])}, "the container port must be the port Governor listens on"
    routes = ops_paths()
    expected = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes, f"{probe} must GET {path}"
        assert ports.get(get["port"], get["port"]) == int(env["GOVERNOR_PORT"])
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "startup budget below 10 min"


def test_drain_fits_in_the_grace_period(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    pre_stop = _container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(_config(docs)["GOVERNOR_DRAIN_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain + TYPICAL_REQUEST_SECONDS


def test_runs_as_the_images_non_root_user(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    for path in DOCKERFILES.values():
        dockerfile = Dockerfile.parse(path)
        assert security["runAsUser"] == dockerfile.created_uid(dockerfile.args("USER")[-1]), path.name
    container_security = _container(docs)["securityContext"]
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"]["drop"] == ["ALL"]


def test_adapters_volume_is_the_claim_at_the_adapters_dir(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "adapters"]
    claim = volume["persistentVolumeClaim"]["claimName"]
    _named(docs, "PersistentVolumeClaim", claim)
    (mount,) = [m for m in _container(docs)["volumeMounts"] if m["name"] == "adapters"]
    assert mount["mountPath"] == _config(docs)["GOVERNOR_ADAPTERS_DIR"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_service_pdb_and_monitor_select_the_pods(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    deployment = _one(docs, "Deployment")
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _one(docs, "Service")
    assert _selects(service["spec"]["selector"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in _container(docs)["ports"]}
    assert _selects(_one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] == port["name"]
            assert endpoint["path"] == "/metrics" and "/metrics" in ops_paths()


def test_one_autoscaler_on_the_engine_queue(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    scalers = [d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    assert len(scalers) == 1, f"{name}: exactly one autoscaler (two would fight over replicas)"
    (scaler,) = scalers
    assert scaler["spec"]["scaleTargetRef"]["name"] == _one(docs, "Deployment")["metadata"]["name"]
    if scaler["kind"] == "ScaledObject":
        (trigger,) = scaler["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert trigger["type"] == "prometheus" and "vllm:num_requests_waiting" in query
        assert f'namespace="{NAMESPACE}"' in query and f'service="{_one(docs, "Service")["metadata"]["name"]}"' in query
        assert scaler["spec"]["minReplicaCount"] >= 1, "scale to zero would mean minutes of engine start per burst"
    else:
        (metric,) = scaler["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"


def _gpus(container: dict[str, Any]) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def test_device_overlays(rendered: tuple[str, list[dict]]) -> None:
    name, docs = rendered
    container = _container(docs)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    env = _config(docs)
    if name == "overlays/cpu":
        assert container["image"].endswith(":cpu") and env["GOVERNOR_DEVICE"] == "cpu"
        assert _gpus(container) == 0 and "nvidia.com/gpu" not in json.dumps(pod)
        assert int(container["resources"]["requests"]["cpu"]) >= 4
    elif name.startswith(("overlays/gpu", "gpu+")):
        assert container["image"].endswith(":gpu") and env["GOVERNOR_DEVICE"] == "gpu"
        assert _gpus(container) >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
        m = re.search(r"--tensor-parallel-size[ =](\d+)", env.get("GOVERNOR_ENGINE_ARGS", ""))
        assert _gpus(container) == (int(m.group(1)) if m else 1), "one GPU per tensor-parallel rank"
