"""Settings: secrets from a file (GOVERNOR_*_FILE), read once at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from governor.settings import Settings


def test_a_secret_file_fills_its_setting(tmp_path: Path) -> None:
    (tmp_path / "engine").write_text("  e-key \n")
    settings = Settings(engine_api_key_file=tmp_path / "engine")
    assert settings.engine_api_key == "e-key"
    assert Settings().engine_api_key == "" and Settings().cache_salt_per_key


def test_a_secret_given_twice_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("a")
    with pytest.raises(ValidationError, match="GOVERNOR_ADMIN_KEY"):
        Settings(admin_key="b", admin_key_file=tmp_path / "admin")
    with pytest.raises(ValidationError, match="missing"):
        Settings(api_keys_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValidationError, match="empty"):
        Settings(admin_key_file=tmp_path / "empty")
