"""deploy/compose.yaml and the Prometheus/Grafana files it mounts, read statically (no Docker engine here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .repo_facts import DEPLOY, REPO, ops_paths, unknown_settings

COMPOSE_FILE = DEPLOY / "compose.yaml"
# The Compose Specification's JSON schema, as published in compose-spec/compose-spec (schema/compose-spec.json,
# commit 170098b); Docker Compose validates files against it before anything else.
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
GOVERNORS = ("governor", "governor-gpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())  # merge keys (<<) resolved as compose does
    assert isinstance(data, dict) and "services" in data
    return data


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors)


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount; named volumes are skipped."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((COMPOSE_FILE.parent / source).resolve(), target))
    return out


def _mount_of(service: dict[str, Any], host: Path) -> str:
    for source, target in _bind_mounts(service):
        if source == host.resolve():
            return target
    raise AssertionError(f"{host} is not mounted")


def test_every_referenced_local_file_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
            assert context == REPO, f"{name}: build context should be the repository root"
            assert (context / service["build"]["dockerfile"]).is_file(), f"{name}: no Dockerfile"
        for source, _ in _bind_mounts(service):
            assert source.exists(), f"{name}: mounted {source} does not exist"


def test_governor_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "profiles" not in services["governor"], "`docker compose up` must start the CPU gateway"
    assert services["governor"]["build"]["dockerfile"].endswith("Dockerfile.cpu")
    gpu = services["governor-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.gpu")
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in GOVERNORS:
        service = services[name]
        env = service["environment"]
        assert not unknown_settings(env), f"{name}: unknown settings {unknown_settings(env)}"
        assert env["GOVERNOR_HOST"] == "0.0.0.0"
        assert _mount_of(service, REPO / "adapters") == env["GOVERNOR_ADAPTERS_DIR"]
        published = [p.rsplit(":", 1)[1] for p in service["ports"]]
        assert published == [env["GOVERNOR_PORT"]], f"{name}: container port is not GOVERNOR_PORT"


def test_governor_healthcheck_uses_ready(compose: dict[str, Any]) -> None:
    for name in GOVERNORS:
        service = compose["services"][name]
        test = " ".join(service["healthcheck"]["test"])
        port = service["environment"]["GOVERNOR_PORT"]
        assert f"http://127.0.0.1:{port}/ready" in test and "/ready" in ops_paths()


def test_prometheus_scrapes_governor_metrics(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_dir = _mount_of(prometheus, DEPLOY / "prometheus")
    assert config_arg == f"--config.file={config_dir}/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "governor"]
    assert job["metrics_path"] == "/metrics" and "/metrics" in ops_paths()
    (sd,) = job["dns_sd_configs"]
    names = {"governor"} | set(services["governor-gpu"]["networks"]["default"]["aliases"])
    assert set(sd["names"]) <= names and "governor" in services
    for name in GOVERNORS:
        assert str(sd["port"]) == services[name]["environment"]["GOVERNOR_PORT"]
    # Alert rules: loaded from the mounted folder, and every file present must parse as rule groups.
    assert all(rule.startswith(config_dir + "/") for rule in config["rule_files"])
    for alerts in (DEPLOY / "prometheus").glob("alerts*.yml"):
        assert isinstance(yaml.safe_load(alerts.read_text()).get("groups"), list), alerts


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert _mount_of(grafana, DEPLOY / "grafana" / "provisioning") == "/etc/grafana/provisioning"
    dashboards_dir = _mount_of(grafana, DEPLOY / "grafana" / "dashboards")
    (datasource,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())[
        "datasources"
    ]
    prometheus_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert datasource["type"] == "prometheus" and datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/governor.yaml").read_text())["providers"]
    assert provider["options"]["path"] == dashboards_dir
    dashboards = list((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert dashboards, "no dashboard to provision"
    for path in dashboards:
        assert "panels" in json.loads(path.read_text()), path
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/")
    assert (DEPLOY / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file()


def _published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each published port, short syntax."""
    out = []
    for port in service.get("ports", []):
        # HOST_IP:HOST_PORT:CONTAINER_PORT; the host port may be `${VAR:-default}`, which holds a colon too
        address, _, rest = str(port).partition(":")
        host, _, container = rest.rpartition(":")
        assert host and not address.startswith("$"), f"{port}: no host address, so Docker publishes it everywhere"
        out.append((address, host, container))
    return out


def test_every_published_port_is_loopback_only(compose: dict[str, Any]) -> None:
    published = {name: _published(service) for name, service in compose["services"].items()}
    assert published["governor"] == [("127.0.0.1", "${GOVERNOR_PUBLISH_PORT:-8000}", "8000")]
    for name in ("governor-gpu", "prometheus", "grafana"):
        assert published[name], f"{name} publishes no port"
    for name, ports in published.items():
        assert all(address == "127.0.0.1" for address, _, _ in ports), f"{name}: {ports}"


def test_grafana_password_has_no_default(compose: dict[str, Any]) -> None:
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD}"
    text = COMPOSE_FILE.read_text()
    assert "GRAFANA_ADMIN_PASSWORD:-" not in text and "GF_SECURITY_ADMIN_PASSWORD: admin" not in text


def test_prometheus_lifecycle_api_is_off(compose: dict[str, Any]) -> None:
    command = compose["services"]["prometheus"]["command"]
    assert not any(arg.startswith("--web.enable-lifecycle") for arg in command), command
    assert not any(arg.startswith("--web.enable-admin-api") for arg in command), command
