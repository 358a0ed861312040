"""The loader's state machine when validation itself breaks: whatever validation raises, the adapter ends
`failed` with a reason and requests for it get a 4xx, never `validating` forever and a 500."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from governor.errors import GovernorError, InvalidRequest
from governor.lora.registry import AdapterRegistry
from tests.lora.factory import AdapterFactory
from tests.lora.fixtures import Engine

Make = Callable[..., AdapterRegistry]


def state(registry: AdapterRegistry, name: str) -> tuple[str, str | None]:
    a = next(a for a in registry.list() if a["name"] == name)
    return a["state"], a["reason"]


async def test_deeply_nested_config_fails_the_adapter(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    folder = factory.copy("good", root / "a")
    depth = 200_000  # json.loads raises RecursionError long before this
    (folder / "adapter_config.json").write_text('{"r": 8, "x": ' + "[" * depth + "]" * depth + "}")
    registry = make_registry()
    await registry.start()
    with pytest.raises(InvalidRequest) as info:
        await registry.load("a", "a")
    assert "nested" in info.value.message
    assert state(registry, "a") == ("failed", info.value.message)
    with pytest.raises(GovernorError) as served:  # a request for it: the cached refusal, a 4xx
        await registry.target("a")
    assert 400 <= served.value.status < 500 and "nested" in served.value.message
    assert engine.fake.load_calls == []


async def test_unexpected_validation_error_fails_the_adapter(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory.copy("good", root / "a")
    registry = make_registry()
    await registry.start()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in a check, /secret/path inside")

    monkeypatch.setattr(registry.loader.validator, "validate", broken)
    with pytest.raises(InvalidRequest) as info:
        await registry.load("a", "a")
    err = info.value
    assert err.status == 400 and err.code == "adapter_validation_failed" and "RuntimeError" in err.message
    assert "/secret/path" not in err.message  # the exception's text goes to the log, not to clients
    assert state(registry, "a") == ("failed", err.message)
    with pytest.raises(GovernorError) as served:
        await registry.target("a")
    assert 400 <= served.value.status < 500
    # Fixed (here: the check works again), a new load succeeds.
    monkeypatch.undo()
    assert (await registry.load("a", "a"))["state"] == "ready"
