"""The open-file limit: raised at startup to the hard limit, and checked against what the settings imply.

Every request in flight holds two descriptors in the gateway (the client's socket and the one to the
engine), and engines Governor starts inherit its limit. On the first GPU run the soft limit stayed at the
usual 1024 while ~830 clients connected: vLLM warned "Too many open files; consider ulimit -n", and both
it and the gateway reset connections.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from governor.settings import Settings

log = logging.getLogger("governor")

# Descriptors besides in-flight requests: the process at rest (interpreter, libraries, logs, model and
# tokenizer files, NVML, the adapters watcher), engine /health and /metrics calls, and clients that are
# past admission (answered 429) or idle on keep-alive. Generous on purpose: descriptors cost nothing.
FD_MARGIN = 1024


@dataclass(frozen=True)
class OpenFiles:
    """The RLIMIT_NOFILE soft limit before and after raising it, the hard limit, and what the settings need."""

    before: int
    soft: int
    hard: int
    needed: int

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed


def engine_count(settings: Settings) -> int:
    """Remote engines named in ENGINE_URL, else the local ones Governor starts."""
    return len(settings.engine_url) or settings.engines


def fds_needed(settings: Settings) -> int:
    """2 x (max_running + max_queued) per engine, plus FD_MARGIN.

    max_running + max_queued is the most requests the pool admits per engine; each holds a client socket
    and an engine socket in the gateway (a local engine's own share, one socket per request, lives in
    its process, which gets this same limit)."""
    return 2 * engine_count(settings) * (settings.max_running + settings.max_queued) + FD_MARGIN


def raise_open_files(needed: int) -> OpenFiles:
    """Raise the soft limit to the hard one (never lower it); unprivileged, so the hard limit stays."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not a valid soft one on Linux (it must be below fs.nr_open): ask for enough.
    target = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    now, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFiles(before=soft, soft=now, hard=hard, needed=needed)


def check_open_files(settings: Settings) -> OpenFiles:
    """At startup: raise the limit, log it, and warn when it is below what these settings need."""
    limit = raise_open_files(fds_needed(settings))
    log.info("open-file limit %d (was %d, hard %s); these settings need about %d",
             limit.soft, limit.before, _show(limit.hard), limit.needed)  # fmt: skip
    if not limit.enough:
        log.warning(
            "the open-file limit (%d) is below the ~%d that %s engine(s) x 2 x (max_running %d + max_queued %d)"
            " + %d need: under load, connections will be refused or reset (EMFILE) in the gateway and its"
            " engines. Raise the hard limit (`ulimit -Hn %d` before starting, LimitNOFILE=%d in systemd,"
            " `--ulimit nofile=%d:%d` in docker) or lower max_running/max_queued.",
            limit.soft, limit.needed, engine_count(settings), settings.max_running,
            settings.max_queued, FD_MARGIN, limit.needed, limit.needed, limit.needed, limit.needed,
        )  # fmt: skip
    return limit


def _show(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)
