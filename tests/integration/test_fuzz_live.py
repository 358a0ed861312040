"""schemathesis against the real engine: hostile bodies that pass Governor's validation reach vLLM,
and must still come back as 4xx envelopes, never 5xx. A CI-sized sample (GOVERNOR_FUZZ_LIVE_EXAMPLES
per operation); generation lengths are capped so valid cases stay short."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import ADMIN_KEY, Live
from tests.fuzz_support import fuzz_all_operations

pytestmark = pytest.mark.engine
EXAMPLES = int(os.environ.get("GOVERNOR_FUZZ_LIVE_EXAMPLES", "8"))


def test_fuzz_against_real_engine(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.fuzz_support.ADMIN", ADMIN_KEY)
    cases = fuzz_all_operations(live.url, EXAMPLES, cap_generation=True)
    print(f"schemathesis (real engine): {sum(cases.values())} cases: {cases}")
    assert sum(cases.values()) >= 3 * len(cases)
    assert httpx.get(live.url + "/ready", timeout=10).status_code == 200  # the engine survived
