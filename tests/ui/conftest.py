"""Fixtures of the web page's tests: the gateway on the fake engine (plain HTTP tests) is tests/api's."""

from tests.api.conftest import gateway  # noqa: F401
