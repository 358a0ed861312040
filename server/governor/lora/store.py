"""The registry's persisted state: which adapters are registered, from where, and which are pinned."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("governor.lora")

FORMAT = 1


class RegistryStore:
    """A JSON file under the state dir, written atomically (temp file + fsync + os.replace)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir).expanduser() / "adapters.json"

    def load(self) -> list[dict[str, Any]]:
        """The saved entries; an unreadable file is logged and treated as empty (never blocks a start)."""
        try:
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
        out = []
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("path"), str):
                out.append({
                    "name": entry["name"], "path": entry["path"], "pinned": bool(entry.get("pinned")),
                    "source": "watch" if entry.get("source") == "watch" else "api",
                })  # fmt: skip
        return out

    def save(self, entries: list[dict[str, Any]]) -> None:
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
