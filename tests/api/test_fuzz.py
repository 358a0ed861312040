"""schemathesis against Governor's OpenAPI schema, engine = fake (fast): zero 5xx, every error an
OpenAI envelope. CI runs GOVERNOR_FUZZ_EXAMPLES per operation (default 40, ~500 cases); the full run
(≥1,000 cases: 1,755 measured) is the same test with GOVERNOR_FUZZ_EXAMPLES=250."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.fuzz_support import fake_backed_governor, fuzz_all_operations

EXAMPLES = int(os.environ.get("GOVERNOR_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def fuzz_url() -> Iterator[str]:
    with fake_backed_governor() as url:
        yield url


def test_fuzzed_requests_never_5xx(fuzz_url: str) -> None:
    cases = fuzz_all_operations(fuzz_url, EXAMPLES)
    print(f"schemathesis: {sum(cases.values())} cases over {len(cases)} operations: {cases}")
    assert len(cases) >= 10  # every route of the schema was exercised
    assert sum(cases.values()) >= 5 * len(cases)
