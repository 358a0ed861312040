"""`governor serve`: one flag per setting, except secrets, which a command line shows to every local user
(`ps`, /proc/PID/cmdline): they come from the environment or a file (issue 28, finding 7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from governor.cli import main as cli
from governor.settings import Settings


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The settings `serve` would start with (nothing starts)."""
    seen: list[Settings] = []
    monkeypatch.setattr("governor.runtime.server.run", seen.append)
    monkeypatch.setattr(cli.logs, "setup", lambda level: None)
    return seen


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli.app, ["serve", *args], env=env or {})


@pytest.mark.parametrize("flag", ["--admin-key", "--api-keys", "--engine-api-key"])
def test_secrets_are_refused_as_flags(started: list[Settings], flag: str) -> None:
    result = invoke(flag, "s3cret-value")
    assert result.exit_code == 2 and not started
    variable = "GOVERNOR_" + flag[2:].upper().replace("-", "_")
    text = " ".join(result.output.split())  # as one line, however the terminal wrapped it
    assert variable in text and f"{variable}_FILE" in text and "ps" in text, text
    assert "s3cret-value" not in text


def test_secrets_come_from_the_environment_or_a_file(started: list[Settings], tmp_path: Path) -> None:
    keys, admin = tmp_path / "keys", tmp_path / "admin"
    keys.write_text("k1\nk2, k3\n\n")
    admin.write_text("adm1n\n")
    result = invoke("--api-keys-file", str(keys), "--admin-key-file", str(admin), "--port", "9001",
                    env={"GOVERNOR_ENGINE_API_KEY": "eng"})  # fmt: skip
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert settings.api_keys == ["k1", "k2", "k3"] and settings.admin_key == "adm1n"
    assert settings.engine_api_key == "eng" and settings.port == 9001
