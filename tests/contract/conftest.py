"""Contract tests: what Governor sends to and expects from vLLM, checked against the vLLM imported here.

They run once per supported version (see vllm_under_test.py); each run says which version it tested.
"""

from __future__ import annotations

from typing import Any

import pytest

from governor.engine import compat
from tests.api.conftest import gateway  # noqa: F401  (the fake-engine gateway, shared)
from tests.contract import vllm_under_test as vut


@pytest.fixture(scope="session", autouse=True)
def vllm_version() -> str:
    """The version under test, checked before any contract test runs: a wrong PYTHONPATH fails loudly."""
    if vut.EXPECTED is not None:
        assert vut.VERSION == vut.EXPECTED, f"expected vLLM {vut.EXPECTED}, imported {vut.describe()}"
    # Governor's own reading (dist-info, no import) agrees with the module Python imported.
    assert compat.installed_version() == vut.VERSION, vut.describe()
    assert compat.is_supported(vut.VERSION), vut.describe()
    return vut.VERSION


def pytest_terminal_summary(terminalreporter: Any) -> None:
    outcomes = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        reports = terminalreporter.stats.get(outcome, [])
        count = len({r.nodeid for r in reports if getattr(r, "nodeid", "").startswith("tests/contract/")})
        if count:
            outcomes[outcome] = count
    summary = ", ".join(f"{n} {o}" for o, n in outcomes.items()) or "none ran"
    terminalreporter.write_line(f"contract tests against {vut.describe()}: {summary}")
