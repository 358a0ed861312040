"""The adapters-root watcher: folders that appear are loaded once complete, removed ones unloaded,
changed ones reloaded under a new internal name; bad events never stop it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from governor.lora import watcher as watcher_mod
from governor.lora.registry import AdapterRegistry
from governor.lora.watcher import AdapterWatcher
from tests.lora.factory import AdapterFactory
from tests.lora.fixtures import Engine, wait_until

Make = Callable[..., AdapterRegistry]


def states(registry: AdapterRegistry) -> dict[str, str]:
    return {a["name"]: a["state"] for a in registry.list()}


async def test_existing_folders_are_registered_and_loaded_at_start(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    for name in ("a", "b", "c"):
        factory.copy("good", root / name)
    factory.copy("good", root / ".hidden")
    registry = make_registry(watch_adapters=True, max_loras=2, max_cpu_loras=2)
    await registry.start()
    assert registry.known_names() == ["a", "b", "c"]
    await wait_until(lambda: len(engine.fake.loaded) == 2, 10, "eager loads up to max_loras")
    await registry.wait_idle()
    assert states(registry) == {"a": "ready", "b": "ready", "c": "discovered"}  # c loads on first use


async def test_new_folder_loaded_changed_reloaded_removed_unloaded(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, tmp_path: Path
) -> None:
    registry = make_registry(watch_adapters=True)
    await registry.start()

    # Events that must be ignored or survived: a temp folder, an invalid name, a folder that never completes.
    factory.copy("good", root / ".partial-upload")
    factory.copy("good", root / "bad..name")
    (root / "empty").mkdir()
    (root / "stray.txt").write_text("not an adapter")
    factory.copy("good", root / "new")  # copied file by file: the watcher waits for it to settle

    await wait_until(lambda: states(registry).get("new") == "ready", 15, "new folder loaded")
    assert set(engine.fake.loaded) == {"new"}
    assert Path(engine.fake.loaded["new"]).parent == tmp_path / "state" / "staged"  # Governor's copy
    assert registry.known_names() == ["new"]
    assert registry.list()[0]["source"] == "watch"

    held = await registry.target("new")
    assert held is not None and held.upstream_model == "new"
    tmp = root / "new" / ".weights.tmp"
    shutil.copyfile(factory.golden("good2") / "adapter_model.safetensors", tmp)
    tmp.replace(root / "new" / "adapter_model.safetensors")
    await wait_until(lambda: "new@2" in engine.fake.loaded, 15, "changed weights reloaded as new@2")
    assert "new" in engine.fake.loaded  # the request in flight keeps its version
    held.done()
    await wait_until(lambda: "new" not in engine.fake.loaded, 5, "old version unloaded")

    shutil.rmtree(root / "new")
    await wait_until(lambda: registry.known_names() == [], 15, "removed folder unregistered")
    await wait_until(lambda: engine.fake.loaded == {}, 5, "removed folder unloaded")
    assert await registry.target("new") is None


async def test_broken_folder_fails_with_reason_and_recovers(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watcher_mod, "BROKEN_SECONDS", 0.2)
    registry = make_registry(watch_adapters=True, max_lora_rank=16)
    await registry.start()
    factory.copy("rank32", root / "big")
    await wait_until(lambda: states(registry).get("big") == "failed", 15, "oversized rank fails")
    assert "rank" in registry.list()[0]["reason"]

    # Fixing the folder in place retries it.
    shutil.copyfile(factory.golden("good") / "adapter_config.json", root / "big" / "adapter_config.json")
    shutil.copyfile(factory.golden("good") / "adapter_model.safetensors", root / "big" / "adapter_model.safetensors")
    await wait_until(lambda: states(registry).get("big") == "ready", 15, "fixed folder loaded")


def test_folder_of(tmp_path: Path) -> None:
    w = AdapterWatcher(tmp_path, sink=None)  # type: ignore[arg-type]
    assert w.folder_of(str(tmp_path / "a" / "adapter_model.safetensors")) == "a"
    assert w.folder_of(str(tmp_path / "a")) == "a"
    assert w.folder_of(str(tmp_path)) is None
    assert w.folder_of(str(tmp_path / ".git" / "x")) is None
    assert w.folder_of(str(tmp_path / "a" / "x.safetensors.part")) is None
    assert w.folder_of("/elsewhere/a") is None


# -- the watcher's completeness check opens nothing it should not --------------------------------------------


# Run in a child process: safetensors' open of a FIFO blocks holding the GIL, so a thread could not even time out.
CHECK = """
import os, sys
from pathlib import Path
from governor.lora.watcher import header_parses

root, folder = Path(sys.argv[1]), Path(sys.argv[2])
weights = folder / "adapter_model.safetensors"
real_is_file = Path.is_file

def is_file_then_swap(path):  # the race: the file checked, then replaced by a FIFO before it is opened
    found = real_is_file(path)
    if path.name == weights.name and real_is_file(weights):
        weights.unlink()
        os.mkfifo(weights)
    return found

Path.is_file = is_file_then_swap
print(header_parses(root, folder))
Path.is_file = real_is_file
if not weights.is_fifo():  # the check never looked twice: swap it now
    weights.unlink()
    os.mkfifo(weights)
print(header_parses(root, folder))
"""


def test_weights_swapped_for_a_fifo_never_hang_the_check(root: Path, factory: AdapterFactory) -> None:
    folder = factory.copy("good", root / "a")
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHECK, str(root.resolve()), str(folder)], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("header_parses hung on a FIFO swapped in for the weights")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"  # a FIFO is not a complete folder


def test_hard_linked_weights_are_not_read(root: Path, tmp_path: Path, factory: AdapterFactory) -> None:
    folder = factory.copy("good", root / "a")
    assert watcher_mod.header_parses(root.resolve(), folder)
    outside = tmp_path / "outside.safetensors"
    os.replace(folder / "adapter_model.safetensors", outside)
    os.link(outside, folder / "adapter_model.safetensors")  # the same file, also named outside the root
    assert not watcher_mod.header_parses(root.resolve(), folder)
