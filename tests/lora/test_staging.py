"""What the engine loads is what Governor validated: staged read-only copies, their lifetime, the swap window
between validation and the engine's load, and remote engines without a shared staging directory.

The engine here is the fake vLLM over real HTTP, extended to read the adapter files at `lora_path` the way
vLLM does (adapter_model.safetensors, else adapter_model.bin through torch.load) so the tests can see the bytes
an engine would have served and whether it would have unpickled anything."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from governor.errors import InvalidRequest
from governor.lora.registry import AdapterRegistry
from governor.lora.validate import ValidatedAdapter
from tests.lora.factory import AdapterFactory
from tests.lora.fixtures import CountingEngine, Engine, running_engine, wait_until

Make = Callable[..., AdapterRegistry]
WEIGHTS = "adapter_model.safetensors"


class ReadingEngine(CountingEngine):
    """Reads the weights at lora_path on load, as vLLM does, recording their digest or the pickle it would open."""

    def __init__(self) -> None:
        super().__init__()
        self.read: dict[str, str] = {}  # lora_name → sha256 of the weights read, or "pickle:<path>"

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        folder = Path(body["lora_path"])
        if (folder / WEIGHTS).is_file():
            self.read[body["lora_name"]] = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
        elif (folder / "adapter_model.bin").is_file():
            self.read[body["lora_name"]] = f"pickle:{folder / 'adapter_model.bin'}"  # vLLM would torch.load it
        else:
            error = {"error": {"message": f"no adapter found at {folder}", "type": "BadRequestError", "code": 400}}
            return web.json_response(error, status=400)
        self.load_calls.append(body["lora_name"])
        self.loaded[body["lora_name"]] = body["lora_path"]
        return web.json_response({"status": "ok"})


class Evil:
    """Unpickling this creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def staged_dirs(tmp_path: Path) -> list[str]:
    root = tmp_path / "state" / "staged"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest_asyncio.fixture(loop_scope="function")
async def engine() -> AsyncIterator[Engine]:
    """This module's engine reads the files it is given (make_registry uses it)."""
    async with running_engine(ReadingEngine()) as handle:
        yield handle


@pytest.fixture
def reading(engine: Engine) -> ReadingEngine:
    assert isinstance(engine.fake, ReadingEngine)
    return engine.fake


def swap_to_other_weights(factory: AdapterFactory, folder: Path) -> None:
    shutil.copyfile(factory.golden("good2") / WEIGHTS, folder / ".incoming")
    os.replace(folder / ".incoming", folder / WEIGHTS)


def swap_to_symlink(factory: AdapterFactory, folder: Path) -> None:
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to(factory.golden("good2") / WEIGHTS)


def swap_to_pickle(marker: Path) -> Callable[[AdapterFactory, Path], None]:
    def swap(_: AdapterFactory, folder: Path) -> None:
        (folder / WEIGHTS).unlink()
        (folder / "adapter_model.bin").write_bytes(pickle.dumps(Evil(marker)))

    return swap


@pytest.mark.parametrize("attack", ["weights", "symlink", "pickle"])
async def test_swap_between_validation_and_engine_load_changes_nothing(
    attack: str, make_registry: Make, reading: ReadingEngine, root: Path, factory: AdapterFactory, tmp_path: Path
) -> None:
    folder = factory.copy("good", root / "a")
    validated = digest(folder / WEIGHTS)
    marker = tmp_path / "pwned"
    swap = {"weights": swap_to_other_weights, "symlink": swap_to_symlink, "pickle": swap_to_pickle(marker)}[attack]
    registry = make_registry()
    await registry.start()
    seen: list[ValidatedAdapter] = []

    async def in_the_window(checked: ValidatedAdapter) -> None:
        seen.append(checked)
        swap(factory, folder)  # after every check, before the engine reads anything

    registry.loader.after_validation = in_the_window
    info = await registry.load("a", "a")

    assert seen and info["state"] == "ready"
    assert reading.read == {"a": validated}  # exactly the validated bytes, whatever the folder holds now
    assert Path(reading.loaded["a"]) == seen[0].staged and not seen[0].staged.is_relative_to(root)
    assert not marker.exists()
    # The next load validates the folder as it is now: a new push, a refusal, never an unchecked read.
    registry.loader.after_validation = None
    if attack == "weights":
        assert (await registry.load("a", "a"))["version"] == 2
        assert reading.read["a@2"] == digest(factory.golden("good2") / WEIGHTS)
    else:
        with pytest.raises(InvalidRequest) as refused:
            await registry.load("a", "a")
        assert ("symlink" if attack == "symlink" else "pickle") in refused.value.message
        assert set(reading.read) == {"a"}
    assert not marker.exists()


async def test_staged_copies_live_as_long_as_a_version_uses_them(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, tmp_path: Path
) -> None:
    (tmp_path / "state" / "staged" / ("0" * 64)).mkdir(parents=True)  # left by an earlier run
    (tmp_path / "state" / "staged" / ".incoming-x").mkdir()
    folder = factory.copy("good", root / "a")
    factory.copy("good", root / "twin")  # the same bytes: one shared copy
    registry = make_registry(max_loras=4, max_cpu_loras=4)
    await registry.start()
    assert staged_dirs(tmp_path) == []
    await registry.load("a", "a")
    await registry.load("twin", "twin")
    [first] = staged_dirs(tmp_path)
    assert engine.fake.loaded["a"] == engine.fake.loaded["twin"]

    held = await registry.target("a")
    assert held is not None
    swap_to_other_weights(factory, folder)
    await registry.load("a", "a")  # version 2; version 1 still serves the request in flight
    assert len(staged_dirs(tmp_path)) == 2
    held.done()
    await wait_until(lambda: "a" not in engine.fake.loaded, 5, "version 1 unloaded")
    second = Path(engine.fake.loaded["a@2"]).name
    assert staged_dirs(tmp_path) == sorted([first, second])  # twin still uses the first copy

    await registry.unload("twin")
    assert staged_dirs(tmp_path) == [second]
    with pytest.raises(InvalidRequest):  # a refused validation leaves no copy behind
        (folder / "adapter_config.json").write_text('{"r": 999}')
        await registry.load("a", "a")
    assert staged_dirs(tmp_path) == [second]
    await registry.unload("a")
    assert staged_dirs(tmp_path) == []


async def test_remote_engine_without_shared_staging_dir_refuses_adapters(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, tmp_path: Path
) -> None:
    factory.copy("good", root / "a")
    remote = f"http://127.0.0.1:{engine.port}"
    registry = make_registry(engine_url=[remote])
    await registry.start()
    with pytest.raises(InvalidRequest) as info:
        await registry.load("a", "a")
    assert "GOVERNOR_STAGING_DIR" in info.value.message and info.value.code == "adapter_staging_unavailable"
    assert engine.fake.loaded == {}
    await registry.stop()
    assert isinstance(engine.fake, ReadingEngine)

    shared = tmp_path / "shared"
    shared.mkdir()
    mount = tmp_path / "engine-mount"  # where the engine mounts the same directory
    mount.symlink_to(shared)
    registry = make_registry(engine_url=[remote], staging_dir=shared, engine_staging_dir=str(mount))
    await registry.start()
    await registry.load("a", "a")
    [name] = os.listdir(shared)
    assert engine.fake.loaded == {"a": f"{mount}/{name}"}  # the engine's view of the same copy
    assert engine.fake.read["a"] == digest(root / "a" / WEIGHTS)


async def test_failed_admin_loads_are_not_persisted_nor_retried(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    factory.copy("good", root / "good")
    factory.copy("rank32", root / "bad-folder")
    first = make_registry(max_lora_rank=16)
    await first.start()
    await first.load("good", "good")
    for name, path in (("etc", "/etc"), ("dots", "../../../../etc"), ("bad", "bad-folder"), ("gone", "nope")):
        with pytest.raises(InvalidRequest if name != "gone" else Exception):
            await first.load(name, path)
    await first.stop()
    saved = json.loads((tmp_path / "state" / "adapters.json").read_text())
    assert [e["name"] for e in saved["adapters"]] == ["good"]

    engine.fake.loaded.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="governor"):
        second = make_registry(max_lora_rank=16)
        await second.start()
        await wait_until(lambda: "good" in engine.fake.loaded, 10, "the persisted adapter restored")
        await second.wait_idle()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert {a["name"]: a["state"] for a in second.list()} == {"good": "ready"}


async def test_state_from_before_the_rule_is_replayed_once(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, tmp_path: Path
) -> None:
    """A format-1 file held refused adapters too: they are tried once more, then no longer written."""
    factory.copy("good", root / "good")
    (tmp_path / "state").mkdir()
    old = {"format": 1, "adapters": [{"name": "good", "path": "good", "pinned": False, "source": "api"},
                                     {"name": "etc", "path": "/etc", "pinned": False, "source": "api"}]}  # fmt: skip
    (tmp_path / "state" / "adapters.json").write_text(json.dumps(old))
    registry = make_registry()
    await registry.start()
    await registry.wait_idle()
    assert {a["name"]: a["state"] for a in registry.list()} == {"good": "ready", "etc": "failed"}
    saved = json.loads((tmp_path / "state" / "adapters.json").read_text())
    assert saved["format"] == 2 and [e["name"] for e in saved["adapters"]] == ["good"]


async def test_evicted_adapters_give_their_copy_up(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, tmp_path: Path
) -> None:
    factory.copy("good", root / "a")
    factory.copy("good2", root / "b")
    registry = make_registry(max_loras=1, max_cpu_loras=1)
    await registry.start()
    await registry.load("a", "a")
    copy_a = staged_dirs(tmp_path)
    await registry.load("b", "b")  # evicts a
    assert {x["name"]: x["state"] for x in registry.list()} == {"a": "evicted", "b": "ready"}
    assert staged_dirs(tmp_path) == [Path(engine.fake.loaded["b"]).name]
    target = await registry.target("a")  # re-validated, re-staged, b evicted in turn
    assert target is not None
    target.done()
    assert staged_dirs(tmp_path) == copy_a and Path(engine.fake.loaded["a"]).name == copy_a[0]
    await registry.unload("b")  # evicted: nothing left to release
    await registry.unload("a")
    assert staged_dirs(tmp_path) == []


async def test_hard_linked_files_are_refused(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, tmp_path: Path
) -> None:
    """A hard link is the file itself under a second name, perhaps outside the root: never read through one."""
    folder = factory.copy("good", root / "a")
    outside = tmp_path / "outside-config.json"
    os.replace(folder / "adapter_config.json", outside)
    os.link(outside, folder / "adapter_config.json")
    registry = make_registry()
    await registry.start()
    with pytest.raises(InvalidRequest) as info:
        await registry.load("a", "a")
    assert "hard link" in info.value.message and "adapter_config.json" in info.value.message
    assert engine.fake.load_calls == [] and staged_dirs(tmp_path) == []
    # A copy of it (one link) loads.
    (folder / "adapter_config.json").unlink()
    shutil.copyfile(outside, folder / "adapter_config.json")
    assert (await registry.load("a", "a"))["state"] == "ready"
