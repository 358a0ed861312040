"""Server paths kept out of what clients read. Where the adapters, the state and the model live tells a
client about the machine, not about its request: /v1 errors (an adapter's failure reason, an engine's
message) carry `<path>` instead. The admin API keeps them: its operator needs them to fix a folder."""

from __future__ import annotations

import re

# The app's own routes, which messages name on purpose ("POST /admin/adapters again").
ROUTES = frozenset({"v1", "admin", "health", "ready", "metrics", "docs", "redoc", "openapi.json"})
_STOP = r"\s'\"`,;()<>\[\]{}"
# An absolute path (or ~/...) standing alone: not the rest of a URL (`s3://b/k`, `http://h:1/p`), a rate or a
# media type (`tokens/s`, `text/plain`: a word before the slash), nor a trailing full stop.
_PATH = re.compile(rf"(?<![\w.:/~>-])~?/[^{_STOP}]*[^{_STOP}.]")


def redact_paths(message: str) -> str:
    """`message` with every absolute filesystem path replaced by `<path>` (the app's routes kept)."""
    if "/" not in message:
        return message
    return _PATH.sub(_replace, message)


def _replace(match: re.Match[str]) -> str:
    path = match[0]
    if path[0] == "/" and path[1:].split("/", 1)[0] in ROUTES:
        return path
    return "<path>"
