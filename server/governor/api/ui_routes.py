"""The web page's routes: its static files under /ui and its two JSON calls under /ui/api.

The static shell (HTML, JS, CSS) is served without a key: it holds no data, and the page must load to ask
for one. Every call that returns data (/ui/api/*, and /v1 from the playground) wants the same user key as
/v1, sent by the page as a Bearer token. Every /ui response carries a strict Content-Security-Policy (no
inline script or style, nothing from another origin, no framing) and no CORS header: another origin's
page can neither read these responses nor embed the page. Mounted only when GOVERNOR_UI is on.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, RedirectResponse, Response

from governor.api.body import read_bytes
from governor.api.deps import user_auth
from governor.errors import NotFound
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

router = APIRouter(prefix="/ui", include_in_schema=False)


async def get_status(request: Request) -> StatusReader:
    status: StatusReader = request.app.state.ui_status
    return status


StatusDep = Annotated[StatusReader, Depends(get_status)]


def _static(name: str) -> Response:
    media_type = STATIC.get(name)
    if media_type is None:
        raise NotFound(f"No such file: /ui/{name}.", code="not_found")
    body = resources.files("governor.ui").joinpath("static").joinpath(name).read_bytes()
    return Response(body, media_type=media_type, headers=HEADERS)


@router.get("")
async def page_root() -> Response:
    return RedirectResponse("/ui/", headers=HEADERS)


@router.get("/")
async def page() -> Response:
    return _static("index.html")


@router.get("/api/status", dependencies=[Depends(user_auth)])
async def status(reader: StatusDep) -> Response:
    """Engines, adapters, the gateway's counters and GPUs, for the status view (polled)."""
    return JSONResponse(await reader.snapshot(), headers=HEADERS)


@router.post("/api/eval", dependencies=[Depends(user_auth)])
async def eval_report(request: Request) -> Response:
    """A saved answers file (the body, JSON lines or gzip) as the eval view's summary, categories and answers."""
    raw = await read_bytes(request, eval_view.MAX_FILE_BYTES)
    body: dict[str, Any] = await run_in_threadpool(eval_view.report, raw)  # judging takes ms per answer
    return JSONResponse(body, headers=HEADERS)


@router.get("/{name}")
async def static_file(name: str) -> Response:
    return _static(name)
