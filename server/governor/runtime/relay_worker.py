"""One relay worker process: ``python -m governor.runtime.relay_worker SPEC WORKER`` (started by the owner,
``runtime/relay_workers.py``). It serves ``api/relay_worker.py``'s app on the public port (SO_REUSEPORT) and
exits when the owner does."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import uvicorn

from governor import logs
from governor.api.relay_worker import Owner, worker_app
from governor.engine.remote import RemoteEngine
from governor.runtime.relay_workers import listening_socket
from governor.settings import Settings

PARENT_CHECK = 1.0


class WorkerServer(uvicorn.Server):
    """uvicorn, stopping by itself once the owner that started it is gone."""

    async def main_loop(self) -> None:
        parent = os.getppid()

        async def orphaned() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(PARENT_CHECK)
            self.should_exit = True

        watch = asyncio.create_task(orphaned())
        try:
            await super().main_loop()
        finally:
            watch.cancel()


def main(spec_path: str, worker: int) -> None:
    spec = json.loads(Path(spec_path).read_text())
    settings = Settings(**spec["settings"])
    logs.setup(settings.log_level)
    engines = {
        e["name"]: RemoteEngine(e["name"], e["base_url"], e["served_model"], api_key=e["api_key"],
                                socket_path=Path(e["socket_path"]) if e["socket_path"] else None)
        for e in spec["engines"]
    }  # fmt: skip
    app = worker_app(settings, Owner(Path(spec["owner"]), spec["token"], worker), engines)
    sock = listening_socket(spec["host"], int(spec["port"]), reuse_port=True)
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", log_level="warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=int(settings.request_timeout), timeout_keep_alive=settings.keep_alive_seconds,
    )  # fmt: skip
    WorkerServer(config).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
