"""The web page's routes: its static files under /ui and its two JSON calls under /ui/api.

The static shell (HTML, JS, CSS) is served without a key: it holds no data, and the page must load to ask
for one. Every call that returns data (/ui/api/*, and /v1 from the playground) wants the same user key as
/v1, sent by the page as a Bearer token; the status call tells what /metrics tells, so where /metrics
wants a key (GOVERNOR_METRICS_AUTH) it does too, and per-adapter usage in it is for the admin key only.
Every /ui response carries a strict Content-Security-Policy (no
inline script or style, nothing from another origin, no framing) and no CORS header: another origin's
page can neither read these responses nor embed the page. Mounted (`build_router()`, once per app) only
when GOVERNOR_UI is on.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from governor.api import auth
from governor.api.auth import presented_key
from governor.api.body import read_bytes
from governor.api.deps import SettingsDep, metrics_auth, user_auth
from governor.errors import NotFound, Overloaded
from governor.ui import eval_view
from governor.ui.status import StatusReader

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# The only files served: a fixed map, so no request path ever reaches the filesystem.
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "evalview.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

# One eval judging at a time: a full file's text, rows and JSON reply are a few hundred MB at the cap, and
# any user key may upload; a second upload meanwhile is told to retry rather than doubling the peak.
EVAL_RETRY_AFTER_S = 5.0


async def get_status(request: Request) -> StatusReader:
    status: StatusReader = request.app.state.ui_status
    return status


StatusDep = Annotated[StatusReader, Depends(get_status)]


def load_static() -> dict[str, bytes]:
    """The shipped files' bytes, read once: a request never touches the filesystem (nor blocks the loop on it)."""
    folder = resources.files("governor.ui").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC}


def _eval_response(raw: bytes) -> Response:
    # In the thread pool with the judging: encoding a large reply takes a while too.
    return JSONResponse(eval_view.report(raw), headers=HEADERS)


def build_router() -> APIRouter:
    """The /ui routes of one app, with the static files loaded and the app's one eval slot."""
    router = APIRouter(prefix="/ui", include_in_schema=False)
    files = load_static()
    eval_slot = asyncio.Semaphore(1)

    def static(name: str) -> Response:
        media_type = STATIC.get(name)
        if media_type is None:
            raise NotFound(f"No such file: /ui/{name}.", code="not_found")
        return Response(files[name], media_type=media_type, headers=HEADERS)

    @router.get("")
    async def page_root() -> Response:
        return RedirectResponse("/ui/", headers=HEADERS)

    @router.get("/")
    async def page() -> Response:
        return static("index.html")

    @router.get("/api/status", dependencies=[Depends(user_auth), Depends(metrics_auth)])
    async def status(request: Request, reader: StatusDep, settings: SettingsDep) -> Response:
        """Engines, adapters, the gateway's counters and GPUs, for the status view (polled).

        It tells what /metrics tells, so it wants what /metrics wants as well as the user key."""
        admin = auth.is_admin(settings, presented_key(request.headers))
        return JSONResponse(await reader.snapshot(admin=admin), headers=HEADERS)

    @router.post("/api/eval", dependencies=[Depends(user_auth)])
    async def eval_report(request: Request) -> Response:
        """A saved answers file (the body, JSON lines or gzip) as the eval view's summary, categories and answers."""
        raw = await read_bytes(request, eval_view.MAX_FILE_BYTES)
        if eval_slot.locked():
            raise Overloaded(
                "Another answers file is being judged; send this one again shortly.",
                retry_after=EVAL_RETRY_AFTER_S,
                code="eval_busy",
            )
        await eval_slot.acquire()  # free: checked just above, nothing awaited since
        # Judging takes ms per answer: in a thread, and the slot is given back when that thread ends, not
        # when this request does (a caller who hangs up must not let a second judging start beside it).
        judging = asyncio.get_running_loop().run_in_executor(None, _eval_response, raw)
        judging.add_done_callback(lambda _: eval_slot.release())
        return await asyncio.shield(judging)

    @router.get("/{name}")
    async def static_file(name: str) -> Response:
        return static(name)

    return router
