"""Adapters a test places on the shared live server and removes after it, so that tests pass in any order:
names made unique per call, folders dropped into the watched root or copied under its hidden `.api/` folder
(which the watcher ignores: only the admin API loads them), and everything placed taken away at the end."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path

import httpx

from tests.conftest import Live, wait_for


def unique(prefix: str) -> str:
    """An adapter name no other test uses: `prefix-` and eight hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def model_ids(live: Live) -> set[str]:
    return {m["id"] for m in httpx.get(live.v1 + "/models", timeout=30).json()["data"]}


def admin_load(live: Live, name: str, path: str) -> httpx.Response:
    return httpx.post(live.url + "/admin/adapters", headers=live.admin(), json={"name": name, "path": path},
                      timeout=120)  # fmt: skip


class Placed:
    """What one test (or module) put on the live server; `remove()` takes all of it away."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.dropped: list[str] = []  # folders in the watched root
        self.hidden: list[str] = []  # folders under .api/, maybe loaded through the admin API

    def drop(self, source: Path, name: str) -> str:
        """Copy an adapter folder into the watched root as `name`; the watcher loads it."""
        self.dropped.append(name)  # recorded first: a half-copied folder is removed too
        shutil.copytree(source, self.live.adapters_dir / name)
        return name

    def hide(self, source: Path, name: str) -> str:
        """Copy an adapter folder under `.api/` as `name`; returns the admin path."""
        self.hidden.append(name)
        shutil.copytree(source, self.live.adapters_dir / ".api" / name)
        return f".api/{name}"

    def load(self, source: Path, name: str) -> httpx.Response:
        """Copy under `.api/` and load it through the admin API."""
        return admin_load(self.live, name, self.hide(source, name))

    def remove(self) -> None:
        """Unload what the admin API loaded, delete every folder placed, and wait until none is listed."""
        for name in self.hidden:
            with contextlib.suppress(httpx.HTTPError):  # one failed unload must not leave the rest behind
                httpx.delete(f"{self.live.url}/admin/adapters/{name}", headers=self.live.admin(), timeout=120)
            path = self.live.adapters_dir / ".api" / name
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
        for name in self.dropped:
            shutil.rmtree(self.live.adapters_dir / name, ignore_errors=True)
        gone = set(self.dropped) | set(self.hidden)
        wait_for(lambda: not gone & model_ids(self.live), 120, what=f"the adapters {sorted(gone)} to be removed")
        self.dropped, self.hidden = [], []
