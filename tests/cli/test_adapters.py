"""`governor adapters …`: the HTTP calls it makes and what it prints (against a mock transport)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from governor.cli import adapters as cli

ROW = {"name": "a", "state": "ready", "pinned": True, "version": 2, "in_flight": 0, "source": "api", "path": "a",
       "reason": None}  # fmt: skip


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/missing"):
            error = {"message": "Adapter 'missing' is not registered.", "type": "invalid_request_error"}
            return httpx.Response(404, json={"error": error})
        if request.method == "GET":
            return httpx.Response(200, json={"object": "list", "data": [ROW]})
        return httpx.Response(200, json=ROW)

    real = httpx.Client

    def client(**kwargs: Any) -> httpx.Client:
        return real(transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(cli.httpx, "Client", client)
    return seen


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    app = typer.Typer()
    cli.register(app)
    return CliRunner().invoke(app, list(args), env=env or {})


def test_list_table_and_json(calls: list[httpx.Request]) -> None:
    result = run("adapters", "--url", "http://gw:9000", "list", env={"GOVERNOR_ADMIN_KEY": "sekret"})
    assert result.exit_code == 0, result.output
    header, row = result.output.strip().splitlines()
    assert header.split() == ["NAME", "STATE", "PINNED", "VERSION", "IN_FLIGHT", "SOURCE", "PATH", "REASON"]
    assert row.split() == ["a", "ready", "yes", "2", "0", "api", "a", "-"]
    request = calls[0]
    assert (request.method, str(request.url)) == ("GET", "http://gw:9000/admin/adapters")
    assert request.headers["authorization"] == "Bearer sekret"
    result = run("adapters", "list", "--json")
    assert json.loads(result.output) == [ROW]


def test_load_unload_pin_use_env(calls: list[httpx.Request]) -> None:
    env = {"GOVERNOR_URL": "http://env:1", "GOVERNOR_ADMIN_KEY": "envkey"}
    assert run("adapters", "load", "a", "folder/a", "--pin", env=env).exit_code == 0
    assert run("adapters", "unload", "a", env=env).exit_code == 0
    assert run("adapters", "pin", "a", env=env).exit_code == 0
    assert run("adapters", "pin", "a", "--off", env=env).exit_code == 0
    assert [(r.method, r.url.path) for r in calls] == [
        ("POST", "/admin/adapters"), ("DELETE", "/admin/adapters/a"),
        ("POST", "/admin/adapters/a/pin"), ("POST", "/admin/adapters/a/unpin"),
    ]  # fmt: skip
    assert json.loads(calls[0].content) == {"name": "a", "path": "folder/a", "pin": True}
    assert all(r.headers["authorization"] == "Bearer envkey" and r.url.host == "env" for r in calls)


def test_the_admin_key_is_refused_as_a_flag_and_read_from_a_file(calls: list[httpx.Request], tmp_path: Path) -> None:
    # a command line is visible to every local user (ps): the key comes from the environment or a file
    result = run("adapters", "--admin-key", "sekret", "list")
    text = " ".join((result.output + (result.stderr or "")).split())
    assert result.exit_code == 2 and "GOVERNOR_ADMIN_KEY_FILE" in text and "sekret" not in text and not calls
    (tmp_path / "admin").write_text("from-file\n")
    assert run("adapters", "--admin-key-file", str(tmp_path / "admin"), "list").exit_code == 0
    assert calls[-1].headers["authorization"] == "Bearer from-file"


def test_errors_print_the_server_message(calls: list[httpx.Request]) -> None:
    result = run("adapters", "unload", "missing")
    assert result.exit_code == 1
    assert "HTTP 404: Adapter 'missing' is not registered." in result.output + (result.stderr or "")
