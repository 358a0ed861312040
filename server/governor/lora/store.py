"""The registry's persisted state: adapters that loaded at least once or were registered by the admin API,
from where, and which are pinned.

Bounded: at most MAX_ENTRIES entries are written or read, and a file over MAX_BYTES is ignored."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("governor.lora")

# Format 1 also held adapters that never loaded (refused admin loads among them): its entries are replayed once
# as not yet loaded, so those that fail again are not written back.
FORMAT = 2
MAX_ENTRIES = 10_000  # thousands of adapters per base are the point of the registry tier
MAX_BYTES = 16 * 1024 * 1024


class RegistryStore:
    """A JSON file under the state dir, written atomically (temp file + fsync + os.replace)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir).expanduser() / "adapters.json"

    def load(self) -> list[dict[str, Any]]:
        """The saved entries; an unreadable file is logged and treated as empty (never blocks a start)."""
        try:
            if self.path.stat().st_size > MAX_BYTES:
                log.warning("ignoring adapter state %s: larger than %d bytes", self.path, MAX_BYTES)
                return []
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable adapter state %s: %s", self.path, exc)
            return []
        entries = data.get("adapters") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            log.warning("ignoring adapter state %s: no 'adapters' list", self.path)
            return []
        loaded = isinstance(data, dict) and data.get("format") == FORMAT
        out = []
        for entry in entries[:MAX_ENTRIES]:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("path"), str):
                out.append({
                    "name": entry["name"], "path": entry["path"], "pinned": bool(entry.get("pinned")),
                    "source": "watch" if entry.get("source") == "watch" else "api", "loaded": loaded,
                })  # fmt: skip
        return out

    def save(self, entries: list[dict[str, Any]]) -> None:
        """Write the first MAX_ENTRIES entries (callers order them by importance)."""
        if len(entries) > MAX_ENTRIES:
            log.warning("adapter state holds the first %d of %d adapters", MAX_ENTRIES, len(entries))
            entries = entries[:MAX_ENTRIES]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"format": FORMAT, "adapters": entries}, indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=".adapters-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
