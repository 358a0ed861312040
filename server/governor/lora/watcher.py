"""AdapterWatcher: folders that appear under the adapters root are loaded once complete, removed ones are
unloaded, changed ones reloaded. A watch event never crashes the watcher: it is logged and skipped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from safetensors import SafetensorError, safe_open
from watchfiles import awatch

from governor.errors import GovernorError
from governor.lora.staging import open_file, open_folder
from governor.lora.validate import CONFIG, WEIGHTS, inside, is_temporary

log = logging.getLogger("governor.lora")

# A folder counts as complete when its files keep the same sizes and mtimes this long (copies in progress
# change them) and the safetensors header parses.
SETTLE_SECONDS = 0.4
POLL_SECONDS = 0.1
# An incomplete folder that stops changing is left alone after this long; its next change wakes it again.
GIVE_UP_SECONDS = 120.0
# A stable folder whose header still does not parse goes to the registry anyway, to be failed with a reason.
BROKEN_SECONDS = 5.0
RETRY_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0

Snapshot = dict[str, tuple[int, int]]


class FolderSink(Protocol):
    """What the watcher tells the registry."""

    async def folder_changed(self, folder_name: str) -> None: ...

    async def folder_removed(self, folder_name: str) -> None: ...

    def knows_folder(self, folder_name: str) -> bool: ...


def snapshot(folder: Path) -> Snapshot | None:
    """Size and mtime of each top-level file (lstat: nothing is opened or followed); None if no folder."""
    try:
        with os.scandir(folder) as entries:
            out = {}
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                out[entry.name] = (st.st_size, st.st_mtime_ns)
            return out
    except (FileNotFoundError, NotADirectoryError):
        return None


def header_parses(root: Path, folder: Path) -> bool:
    """True when the folder lies inside `root` and its weights' safetensors header parses: the folder is complete.

    The weights are opened the way staging opens them (staging.open_file: no symlink followed, never blocking,
    a regular file with one name), so a FIFO swapped in cannot pin the thread, nor a link lead out of the root;
    the header is then parsed through that descriptor (/dev/fd/N names the file already open, not a path)."""
    resolved = inside(root, folder)
    if resolved is None:
        return False
    try:
        dir_fd = open_folder(root, resolved, folder.name)
        try:
            fd, _ = open_file(dir_fd, WEIGHTS, folder.name)
        finally:
            os.close(dir_fd)
        try:
            with safe_open(f"/dev/fd/{fd}", framework="numpy") as f:
                f.keys()
        finally:
            os.close(fd)
        return True
    except (GovernorError, OSError, SafetensorError, ValueError):
        return False


class AdapterWatcher:
    """Watches one root with watchfiles; one settle task per folder while it is changing."""

    def __init__(self, root: Path, sink: FolderSink, settle: float = SETTLE_SECONDS) -> None:
        self.root = root
        self.sink = sink
        self.settle = settle
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._settling: dict[str, asyncio.Task[None]] = {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="adapter-watcher")

    async def stop(self) -> None:
        self._stop.set()
        tasks = [t for t in (self._task, *self._settling.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def folder_of(self, path: str) -> str | None:
        """The top-level folder name an event path belongs to, or None (root itself, hidden, temporary)."""
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return None
        if not rel.parts or any(is_temporary(part) for part in rel.parts):
            return None
        return rel.parts[0]

    async def _run(self) -> None:
        delay = RETRY_SECONDS
        while not self._stop.is_set():
            try:
                watching = False
                async for changes in awatch(
                    self.root, stop_event=self._stop, watch_filter=None, debounce=200, yield_on_timeout=True,
                    rust_timeout=1000,
                ):  # fmt: skip
                    if not watching:
                        # The first yield proves the watch is set up: catch folders that appeared before it.
                        watching, delay = True, RETRY_SECONDS
                        self._rescan()
                    for name in {f for _, path in changes if (f := self.folder_of(path)) is not None}:
                        self.poke(name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("adapter watcher failed; restarting it", extra={"root": str(self.root)})
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)  # a root that stays broken is not logged every 2 s

    def _rescan(self) -> None:
        try:
            names = [p.name for p in self.root.iterdir() if p.is_dir() and not is_temporary(p.name)]
        except OSError:
            return
        for name in names:
            if not self.sink.knows_folder(name):
                self.poke(name)

    def poke(self, name: str) -> None:
        """Something changed in folder `name`: settle it (a running settle task sees the change itself)."""
        task = self._settling.get(name)
        if task is None or task.done():
            self._settling[name] = asyncio.get_running_loop().create_task(self._settle(name), name=f"settle-{name}")

    async def _settle(self, name: str) -> None:
        try:
            await self._settle_folder(name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("adapter folder event failed", extra={"adapter": name})
        finally:
            if self._settling.get(name) is asyncio.current_task():
                del self._settling[name]

    async def _settle_folder(self, name: str) -> None:
        folder = self.root / name
        if folder.is_symlink() and inside(self.root, folder) is None:
            await self.sink.folder_changed(name)  # never looked into: the registry refuses it with the reason
            return
        last: Snapshot | None = None
        changed_at = time.monotonic()
        while True:
            snap = snapshot(folder)
            now = time.monotonic()
            if snap is None:
                await self.sink.folder_removed(name)
                return
            if snap != last:
                last, changed_at = snap, now
            elif now - changed_at >= self.settle and CONFIG in snap and WEIGHTS in snap:
                parses = await asyncio.to_thread(header_parses, self.root, folder)
                if parses or now - changed_at >= self.settle + BROKEN_SECONDS:
                    await self.sink.folder_changed(name)
                    if snapshot(folder) == snap:
                        return
                    last, changed_at = None, now  # it changed while loading: settle again
                    continue
            if now - changed_at > GIVE_UP_SECONDS:
                log.warning("adapter folder incomplete; waiting for it to change", extra={"adapter": name})
                return
            await asyncio.sleep(POLL_SECONDS)
