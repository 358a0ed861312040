"""A stand-in for `governor serve` (named as a fake): the real VllmProcess supervising a fake engine.

The fake engine is a process tree shaped like vLLM's: an "API server" whose child ("EngineCore")
starts a grandchild in a session of its own ("worker", outside the process group). Every pid is
appended to PIDS_FILE. With FAKE_STUBBORN set the "API server" notes SIGTERM there and keeps running.
Usage: python -m tests.engine.fake_governor PIDS_FILE RECORD
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from governor.engine.process import VllmProcess

WORKER = (
    "import subprocess, sys, time\n"
    "w = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
    "open(sys.argv[1], 'a').write(f'worker {w.pid}\\n')\n"
    "time.sleep(300)\n"
)
API_SERVER = (
    "import os, signal, subprocess, sys, time\n"
    "def term(*_):  # a slow shutdown: note the SIGTERM, keep running\n"
    "    open(sys.argv[1], 'a').write(f'sigterm {os.getpid()}\\n')\n"
    "if os.environ.get('FAKE_STUBBORN'): signal.signal(signal.SIGTERM, term)\n"
    "open(sys.argv[1], 'a').write(f'api {os.getpid()}\\n')\n"
    "core = subprocess.Popen([sys.executable, '-c', sys.argv[2], sys.argv[1]])\n"
    "open(sys.argv[1], 'a').write(f'core {core.pid}\\n')\n"
    "time.sleep(300)\n"
)


async def main(pids_file: str, record: str) -> None:
    engine = VllmProcess(
        name="fake-0",
        command=[sys.executable, "-c", API_SERVER, pids_file, WORKER],
        env=dict(os.environ),
        served_model="fake",
        log_path=Path(pids_file).with_suffix(".log"),
        start_timeout=600,
        backoff_max=60,
        port=9,  # nothing answers: the supervisor just keeps waiting for health
        record=Path(record),
    )
    await engine.start()
    # Like Governor on SIGTERM: start stopping the engine (a SIGKILL may land in the middle of it).
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(engine.stop()))
    try:
        await asyncio.sleep(600)
    finally:
        await engine.stop()


if __name__ == "__main__":
    # SIGINT stops it, as it stops Governor (uvicorn installs its own handler), even when started from a
    # shell's background job, whose children inherit SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
