"""Fixtures of the engine tests: what a test places on the shared live server is removed after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Live
from tests.integration.placed import Placed


@pytest.fixture
def placed(live: Live) -> Iterator[Placed]:
    """Adapters placed by one test, removed after it whatever its outcome."""
    made = Placed(live)
    yield made
    made.remove()
