"""A CI-sized soak: 200 concurrent streaming clients against the real engine for a bounded time.
Every stream ends with [DONE] or an error event, never a 5xx or a silently truncated body.
The full soak (RSS growth check over minutes) is `governor bench soak`."""

from __future__ import annotations

import asyncio

import pytest

from governor.bench.soak import soak
from tests.conftest import Live

pytestmark = pytest.mark.engine


def test_200_concurrent_streams(live: Live) -> None:
    result = asyncio.run(soak(live.url, live.model, clients=200, seconds=20, max_tokens=4))
    print(result.summary())
    assert result.streams >= 200
    assert result.outcomes["truncated"] == 0 and result.outcomes["transport_error"] == 0
    assert result.outcomes["server_error"] == 0 and not [s for s in result.statuses if s >= 500]
    assert result.outcomes["done"] >= 200
