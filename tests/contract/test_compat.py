"""governor.engine.compat: the supported range, the installed version, and the startup warning."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from governor.engine import compat
from tests.contract import vllm_under_test as vut

PACKAGE = Path(compat.__file__).resolve().parents[1]


def test_reads_the_version_python_imports_without_importing_vllm() -> None:
    assert compat.installed_version() == vut.VERSION
    assert compat.is_supported(vut.VERSION)
    assert compat.unsupported_reason(vut.VERSION) is None


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.24.9", False), ("0.25.0", True), ("0.25.0rc1", True), ("0.28.1", True), ("0.32.0+cpu", True),
     ("0.32.9", True), ("0.33.0", False), ("1.0.0", False), ("dev", False)],
)  # fmt: skip
def test_supported_range(version: str, supported: bool) -> None:
    assert compat.is_supported(version) is supported


def test_startup_warning_outside_the_range(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("governor.test-compat")
    monkeypatch.setattr(compat, "installed_version", lambda: "0.40.1")
    with caplog.at_level(logging.INFO, logger=log.name):
        assert compat.warn_if_unsupported(log) == "0.40.1"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "0.40.1" in record.message and compat.SUPPORTED in record.message
    caplog.clear()
    monkeypatch.setattr(compat, "installed_version", lambda: None)
    with caplog.at_level(logging.INFO, logger=log.name):
        compat.warn_if_unsupported(log)
    assert caplog.records[0].levelno == logging.WARNING and "not installed" in caplog.records[0].message
    caplog.clear()
    monkeypatch.setattr(compat, "installed_version", lambda: "0.32.0")
    with caplog.at_level(logging.INFO, logger=log.name):
        compat.warn_if_unsupported(log)
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_no_version_checks_outside_compat() -> None:
    """Differences between vLLM versions live in engine/compat.py; nothing else reads vLLM's version."""
    reads = re.compile(r"vllm\.__version__|version\(\s*['\"]vllm|from vllm\.version import|import vllm\.version")
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "compat.py" and reads.search(path.read_text())
    ]
    assert offenders == []
