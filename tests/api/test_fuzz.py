"""schemathesis against Governor (engine = the fake, fast), positive and negative modes: zero 5xx, every
error an OpenAI envelope (in a body or inside a stream), every generation body that breaks the schema
refused with a 4xx. The schema comes from the app in-process (its /openapi.json is off by default).

CI runs GOVERNOR_FUZZ_EXAMPLES cases per operation and mode (default 25: ~230 cases, ~30 s); the
benchmark run (≥1,000 cases) is `python loadtests/fuzz.py --examples 150`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from governor.bench.fake_engine import MODEL
from tests.fuzz_support import app_schema, fake_backed_governor, fuzz_all_operations

EXAMPLES = int(os.environ.get("GOVERNOR_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_url() -> Iterator[str]:
    with fake_backed_governor() as url:
        yield url


def test_schema_comes_from_the_app_and_documents_the_request_bodies() -> None:
    schema = app_schema()
    assert len(schema["paths"]) >= 10
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages"} <= set(body["required"])  # a real model, so negative mode has rules to break


def test_fuzzed_requests_positive_and_negative(fuzz_url: str) -> None:
    report = fuzz_all_operations(fuzz_url, EXAMPLES, model=MODEL)
    print(report.summary())
    assert report.violations == []
    assert report.total("positive") >= 5 * 11 and report.total("negative") >= EXAMPLES
    # negative mode really sends invalid bodies, and Governor refuses each of them
    assert report.negative_bodies >= EXAMPLES
    assert report.negative_rejected == report.negative_bodies, report.accepted
    # positive cases that name the served model reach the engine and succeed
    assert report.statuses["positive 200"] >= 5
