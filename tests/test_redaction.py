"""Server paths out of what clients read: absolute paths become <path>, routes and URLs stay."""

from __future__ import annotations

import pytest

from governor.redaction import redact_paths
from governor.stream.sse import event_error

KEPT = [
    "fix it and POST /admin/adapters again",
    "GET /v1/models/{name} or /health",
    "fetched from s3://bucket/adapters/a and https://host:9000/x/y",
    "40 tokens/s as text/event-stream, 1/2 of it; a / b",
    "model 'org/name'",
]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("under the adapters root (/srv/adapters).", "under the adapters root (<path>)."),
        ("Permission denied: '/tmp/x/adapter_model.safetensors'", "Permission denied: '<path>'"),
        ("No such file: /root/.cache/governor/state/x.json, sorry", "No such file: <path>, sorry"),
        ("cache under ~/.cache/governor", "cache under <path>"),
        ('{"path": "/var/lib/governor"}', '{"path": "<path>"}'),
        *((m, m) for m in KEPT),
    ],
)
def test_paths_are_replaced_and_routes_and_urls_kept(message: str, expected: str) -> None:
    assert redact_paths(message) == expected


def test_an_engine_error_event_loses_its_paths() -> None:
    error = event_error({"error": {"message": "cannot open /opt/models/x/tokenizer.json", "code": 400}})
    assert error is not None and error.message == "cannot open <path>" and error.status == 400
