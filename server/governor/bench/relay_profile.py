"""Where the gateway's CPU goes per relayed event: py-spy samples the gateway during one load run, each
sample is put in one bucket by the innermost frame that names a part of the relay, and the buckets share
out the run's measured µs per event.

py-spy is a development tool (pip install py-spy), not a dependency: without it the profile is skipped
with a line that says so."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from governor.bench.gateway import PROMPT

if TYPE_CHECKING:
    from governor.bench.relay_cpu import Meter

# (bucket, path fragments); the innermost frame matching one decides. asyncio's own frames are skipped
# so that a future completed inside aiohttp's read counts as the read.
_PER_REQUEST = ("governor/api/", "governor/serving/", "governor/policy/", "governor/engine/", "fastapi/", "pydantic")
BUCKETS = (
    ("loop detector", ("stream/loop_detector.py", "stream/line_repeats.py", "stream/periodic_runs.py")),
    ("parse (relay, SSE)", ("stream/relay.py", "stream/sse.py", "stream/assemble.py", "orjson")),
    ("read (aiohttp)", ("aiohttp/", "engine/remote.py")),
    ("write (uvicorn, ASGI)", ("uvicorn/", "starlette/", "api/sse_response.py")),
    ("metrics", ("governor/metrics/", "prometheus_client/")),
    ("per request (routes, policy, admission)", _PER_REQUEST),
)
SKIPPED = ("asyncio/", "<frozen", "contextlib.py", "typing.py", "abc.py")
# The frames that start the server sit under every sample: never a bucket of their own.
OUTER = (
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "uvicorn/main.py",
    "governor/runtime/",
    "governor/cli/",
    "governor/__main__.py",
    "typer/",
    "runpy",
)
LOOP = "event loop (wakeups, scheduling)"


def bucket(stack: str) -> str:
    """One folded py-spy stack (outermost first, frames joined by ';') → its bucket."""
    for frame in reversed(stack.split(";")):
        if any(s in frame for s in SKIPPED + OUTER):
            continue
        for name, fragments in BUCKETS:
            if any(f in frame for f in fragments):
                return name
    return LOOP


def buckets(folded: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in folded.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[bucket(stack)] += int(n)
    return counts


def profile_run(meter: Meter, url: str, model: str, preset: str, concurrency: int, tokens: int, logs: Path,
                stamp: float) -> Iterator[str]:  # fmt: skip
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        yield "profile skipped: py-spy is not installed (pip install py-spy)"
        return
    out = logs / f"profile-{preset}-{concurrency}-{int(stamp)}.txt"
    cmd = [spy, "record", "--pid", str(meter.gateway.pid), "--rate", "250", "--format", "raw", "--output", str(out),
           "--nonblocking"]  # fmt: skip
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "decoding_preset": preset}  # fmt: skip
    try:
        run = asyncio.run(meter.run(url, body, concurrency, 2 * concurrency))
    finally:
        spy_proc.send_signal(2)  # py-spy writes its file on SIGINT
        _, err = spy_proc.communicate(timeout=60)
    if not out.exists():
        yield f"profile failed: {err.decode(errors='replace').strip()[-300:]}"
        return
    counts = buckets(out.read_text())
    total = sum(counts.values()) or 1
    per_event = meter.gross(run)[0]  # py-spy sees the idle background too: nothing subtracted
    parts = ", ".join(f"{name} {n / total * per_event:.1f}" for name, n in counts.most_common())
    yield f"profile {preset}, {concurrency} streams ({total} samples, {per_event:.1f} µs/event in all): {parts}"
