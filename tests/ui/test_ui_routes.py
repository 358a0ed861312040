"""The web page's routes over HTTP (fake engine): off switch, the key on its data calls (and /metrics' rule on
status), headers, no CORS, the static files' weight, the eval call against `governor eval report`'s own numbers
and what it refuses (malformed rows, bombs, cut gzip, a second judging at once), data never served as HTML."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import threading
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from governor.api.ui_routes import STATIC
from governor.bench.fake_engine import FakeEngine
from governor.eval import loops as ev
from governor.eval import report
from governor.ui import eval_view
from tests.api.conftest import USER, GatewayFactory
from tests.ui import answers

PAGE_WEIGHT_LIMIT = 200 * 1024
BEARER = {"Authorization": f"Bearer {USER}"}


async def test_ui_off_is_404(gateway: GatewayFactory) -> None:
    gw = await gateway(ui=False)
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/api/status"):
        assert (await gw.client.get(path)).status_code == 404, path
    assert (await gw.client.post("/ui/api/eval", content=b"{}")).status_code == 404


async def test_the_shell_loads_without_a_key_and_every_data_call_wants_one(gateway: GatewayFactory) -> None:
    gw = await gateway(api_keys=[USER])
    # The shell holds no data and must load to ask for the key.
    page = await gw.client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/ui/app.js">' in page.text
    assert (await gw.client.get("/ui", follow_redirects=False)).headers["location"] == "/ui/"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = await gw.client.get("/ui/api/status", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        r = await gw.client.post("/ui/api/eval", headers=headers, content=answers.write.__doc__ or "")
        assert r.status_code == 401, r.text
    # The playground's calls are /v1's, with /v1's key.
    assert (await gw.client.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
    status = await gw.client.get("/ui/api/status", headers=BEARER)
    assert status.status_code == 200, status.text
    body = status.json()
    assert [e["name"] for e in body["engines"]] == ["fake-0"]
    assert body["engines"][0]["state"] == "ready" and body["engines"][0]["kind"] == "remote"
    assert set(body["gateway"]) >= {"running", "waiting", "output_tokens_total", "requests_total"}
    assert body["gpus"] == [] or all("memory_total_bytes" in g for g in body["gpus"])


async def test_every_ui_response_has_a_strict_csp_and_no_cors(gateway: GatewayFactory) -> None:
    gw = await gateway()
    evil = {"Origin": "https://evil.example"}
    for name in STATIC:
        r = await gw.client.get(f"/ui/{name}", headers=evil)
        assert r.status_code == 200, name
        csp = r.headers["content-security-policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                          "frame-ancestors 'none'"):  # fmt: skip
            assert directive in csp, (name, directive)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert not any(h.startswith("access-control-") for h in r.headers), r.headers
    r = await gw.client.get("/ui/api/status", headers=evil)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    preflight = await gw.client.options("/ui/api/status", headers={**evil, "Access-Control-Request-Method": "GET"})
    assert preflight.status_code >= 400 and "access-control-allow-origin" not in preflight.headers
    # No inline script or style in the shell (the CSP would block them anyway).
    page = (await gw.client.get("/ui/")).text
    assert "<script>" not in page and "<style" not in page and " style=" not in page and " on" + "click=" not in page


async def test_only_the_shipped_files_are_served(gateway: GatewayFactory) -> None:
    gw = await gateway()
    for path in ("/ui/nope.js", "/ui/..%2Fsettings.py", "/ui/static%2Fapp.js", "/ui/__init__.py"):
        assert (await gw.client.get(path)).status_code == 404, path


async def test_page_weight_is_under_200_kb(gateway: GatewayFactory) -> None:
    gw = await gateway()
    sizes = {name: len((await gw.client.get(f"/ui/{name}")).content) for name in STATIC}
    assert all(sizes.values()), sizes
    assert sum(sizes.values()) < PAGE_WEIGHT_LIMIT, sizes
    shipped = Path(__file__).parents[2] / "server" / "governor" / "ui" / "static"
    assert {p.name for p in shipped.iterdir()} == set(STATIC)  # every shipped file is counted (and served)


@pytest.mark.parametrize("gzipped", [False, True])
async def test_eval_call_gives_the_reports_numbers(gateway: GatewayFactory, tmp_path: Path, gzipped: bool) -> None:
    gw = await gateway()
    path = answers.write(tmp_path, gzipped)
    r = await gw.client.post("/ui/api/eval", content=path.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["categories"] == list(ev.CATEGORIES)
    expected = {run.config: ev.metrics(run) for run in report.read_answers([path])}
    assert [g["config"] for g in body["groups"]] == ["off", "balanced"]
    for group in body["groups"]:
        m = expected[group["config"]]
        assert (group["loop_rate"], group["factual"], group["intended"], group["errors"]) == (
            m.loop_rate, m.factual, m.repetition, m.errors)  # fmt: skip
    off = body["groups"][0]["categories"]
    assert off["story"] == {"answers": 2, "hits": 1, "measure": "loops"}
    assert off["fact"] == {"answers": 1, "hits": 1, "measure": "ok"}
    texts = {(a["group"], a["id"]): a for a in body["answers"]}
    assert texts[(0, "story-01")]["text"] == answers.LOOP and texts[(0, "story-01")]["loops"] is True
    assert texts[(1, "code-02")]["error"] == "503: engine_unavailable"
    assert len(body["answers"]) == sum(len(r.answers) for r in answers.runs())


async def test_eval_call_refuses_what_is_not_an_answers_file(gateway: GatewayFactory) -> None:
    gw = await gateway()
    for raw in (b"not json\n", b'{"config": "off"}\n', gzip.compress(b"x")[:-4] + b"\x00\x00\x00\x00",
                b'{"config":"off","temperature":0,"seed":0,"id":"no-such-prompt","finish":"stop","stop_reason":null,'
                b'"tokens":1,"error":null,"text":"x"}\n'):  # fmt: skip
        r = await gw.client.post("/ui/api/eval", content=raw)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_answers", (raw, r.text)
    # Bigger than the cap once inflated, a few KB sent: compressed a chunk at a time, never whole in memory.
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\n" * (1024 * 1024)
    bomb = b"".join(packer.compress(chunk) for _ in range(eval_view.MAX_TEXT_BYTES // len(chunk) + 1))
    bomb += packer.flush()
    r = await gw.client.post("/ui/api/eval", content=bomb)
    assert r.status_code == 413, r.text
    r = await gw.client.post("/ui/api/eval", content=b"\n" * (eval_view.MAX_FILE_BYTES + 1))
    assert r.status_code == 413, r.text


ROW = {"config": "off", "temperature": 0, "seed": 0, "id": "story-01", "split": "tune", "finish": "stop",
       "stop_reason": None, "tokens": 1, "correct": None, "loop": None, "error": None, "text": "x"}  # fmt: skip


@pytest.mark.parametrize(
    "field,value",
    [("temperature", float("nan")), ("temperature", "inf"), ("temperature", float("inf")), ("text", None),
     ("text", 5), ("error", 3), ("finish", ["stop"]), ("seed", 1.5), ("tokens", -1), ("stop_reason", {})],
)  # fmt: skip
async def test_eval_call_refuses_a_malformed_row_as_400_not_500(
    gateway: GatewayFactory, field: str, value: Any
) -> None:
    gw = await gateway()
    line = json.dumps({**ROW, field: value})  # NaN and Infinity written as Python's json writes them
    r = await gw.client.post("/ui/api/eval", content=(json.dumps(ROW) + "\n" + line + "\n").encode())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_answers")
    assert f":2: not an answers row: {field}" in error["message"], error


async def test_eval_call_reads_gzip_members_in_turn_and_refuses_a_cut_or_padded_one(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await gateway()
    text = answers.write(tmp_path).read_bytes()
    lines = text.splitlines(keepends=True)
    whole = (await gw.client.post("/ui/api/eval", content=text)).json()
    # `cat a.gz b.gz`: two members, read as one file (as gzip -d and gzip.decompress read it)
    joined = gzip.compress(b"".join(lines[:3])) + gzip.compress(b"".join(lines[3:]))
    r = await gw.client.post("/ui/api/eval", content=joined)
    assert r.status_code == 200, r.text
    assert r.json() == whole
    packed = gzip.compress(text)
    for cut in (packed[:-8], packed[: len(packed) // 2], packed + b"junk", joined[:-3]):
        r = await gw.client.post("/ui/api/eval", content=cut)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_answers", r.text


async def test_a_second_judging_meanwhile_is_told_to_retry(
    gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await gateway()
    body = answers.write(tmp_path).read_bytes()
    started, release = threading.Event(), threading.Event()
    real_report = eval_view.report

    def held_report(raw: bytes) -> dict[str, Any]:  # a fake slow judging: the real one, once the test says so
        started.set()
        release.wait(30)
        return real_report(raw)

    monkeypatch.setattr(eval_view, "report", held_report)
    first = asyncio.create_task(gw.client.post("/ui/api/eval", content=body))
    try:
        assert await asyncio.to_thread(started.wait, 30)
        busy = await gw.client.post("/ui/api/eval", content=body)
        assert busy.status_code == 429, busy.text
        assert busy.json()["error"]["code"] == "eval_busy" and busy.json()["error"]["type"] == "rate_limit_error"
        assert int(busy.headers["retry-after"]) >= 1
    finally:
        release.set()
    assert (await first).status_code == 200
    assert (await gw.client.post("/ui/api/eval", content=body)).status_code == 200  # the slot was given back


MARKUP = "<img src=x onerror=alert(1)>"


async def test_markup_in_answers_comes_back_as_json_data(gateway: GatewayFactory) -> None:
    gw = await gateway(admin_key="admin")
    line = json.dumps({**ROW, "config": MARKUP, "text": MARKUP + "</pre><script>alert(1)</script>"})
    r = await gw.client.post("/ui/api/eval", content=line.encode())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and r.headers["x-content-type-options"] == "nosniff"
    body = r.json()
    assert body["groups"][0]["config"] == MARKUP and body["answers"][0]["text"].startswith(MARKUP)
    # An adapter cannot be named so (names are [A-Za-z0-9._-]); the status call stays JSON without it.
    admin = {"Authorization": "Bearer admin"}
    refused = await gw.client.post("/admin/adapters", headers=admin, json={"name": MARKUP, "path": "x"})
    assert refused.status_code == 400, refused.text
    status = await gw.client.get("/ui/api/status", headers=admin)
    assert status.headers["content-type"] == "application/json" and status.json()["adapters"] == []


def test_page_scripts_never_turn_data_into_html() -> None:
    """Everything the page shows from data goes through textContent (dom.js `el`, `fill`): no HTML sinks."""
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\s*\(|new\s+Function\b|"
                       r"setTimeout\s*\(\s*[\"'`]")  # fmt: skip
    shipped = Path(__file__).parents[2] / "server" / "governor" / "ui" / "static"
    scripts = sorted(shipped.glob("*.js"))
    assert {p.name for p in scripts} == {n for n in STATIC if n.endswith(".js")}
    for script in scripts:
        found = sinks.findall(script.read_text(encoding="utf-8"))
        assert not found, (script.name, found)


async def test_status_lists_adapters_without_server_paths(gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await gateway(admin_key="admin")
    admin = {"Authorization": "Bearer admin"}
    r = await gw.client.post("/admin/adapters", headers=admin, json={"name": "broken", "path": "missing"})
    assert r.status_code == 404, r.text
    # The admin API names the adapters root (its operator fixes the folder); the page's status does not.
    (listed,) = (await gw.client.get("/admin/adapters", headers=admin)).json()["data"]
    assert str(tmp_path) in listed["reason"]
    status = (await gw.client.get("/ui/api/status", headers=admin)).json()
    (row,) = status["adapters"]
    assert (row["name"], row["state"], row["tier"], row["pinned"]) == ("broken", "failed", "registry", False)
    assert "does not exist under the adapters root (<path>)" in row["reason"] and "path" not in row
    assert row["requests"] == 0 and "last_used" in row
    assert str(tmp_path) not in httpx.Response(200, json=status).text
    # Without the admin key: the adapter and its state, not who used it when, nor why it failed.
    (row,) = (await gw.client.get("/ui/api/status")).json()["adapters"]
    assert (row["name"], row["state"]) == ("broken", "failed")
    assert not {"requests", "last_used", "reason", "path"} & set(row), row


@pytest.mark.parametrize("metrics_auth", [False, True])
async def test_status_wants_what_metrics_wants(gateway: GatewayFactory, metrics_auth: bool) -> None:
    # No user keys: /v1 is open; with GOVERNOR_METRICS_AUTH, /metrics (and so status) still wants a key.
    gw = await gateway(admin_key="admin", metrics_auth=metrics_auth)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer admin"}):
        metrics = await gw.client.get("/metrics", headers=headers)
        status = await gw.client.get("/ui/api/status", headers=headers)
        assert status.status_code == metrics.status_code, (headers, status.text, metrics.status_code)
        assert status.status_code == (401 if metrics_auth and headers.get("Authorization") != "Bearer admin" else 200)


class VersionEngine(FakeEngine):
    """A fake engine with vLLM's /version: answering, or hanging until `release` is set; counts the asks."""

    def __init__(self, hang: bool) -> None:
        super().__init__()
        self.hang, self.asked, self.release = hang, 0, asyncio.Event()
        self.app.add_routes([web.get("/version", self.version)])

    async def version(self, _: web.Request) -> web.Response:
        self.asked += 1
        if self.hang:
            await self.release.wait()
        return web.json_response({"version": "0.0.fake"})


@pytest.mark.parametrize("hang", [False, True])
async def test_engine_version_is_asked_once_per_engine_start(gateway: GatewayFactory, hang: bool) -> None:
    fake = VersionEngine(hang)
    gw = await gateway(fake=fake)
    try:
        for _ in range(3):
            r = await gw.client.get("/ui/api/status")
            (engine,) = r.json()["engines"]
            assert engine["version"] == (None if hang else "0.0.fake")
        assert fake.asked == 1  # a hung engine's failure is kept as its answer would be, not asked every poll
    finally:
        fake.release.set()


async def test_status_gpus_come_from_the_collectors_last_reading(gateway: GatewayFactory) -> None:
    from governor.metrics.gpu import GpuCollector
    from governor.ui.status import StatusReader
    from tests.metrics.fake_nvml import FakeNvml, Tokens

    gw = await gateway()
    nvml = FakeNvml()
    gpu = GpuCollector(Tokens(), nvml=nvml, interval=0.01)
    try:
        reader = StatusReader(gw.settings, gw.pool, None, gw.app.state.metrics, gpu)
        gpu.start()
        async with asyncio.timeout(10):
            while gpu.rounds < 1:
                await asyncio.sleep(0.01)
        gpus = (await reader.snapshot())["gpus"]
        assert [(g["index"], g["name"]) for g in gpus] == [("0", "NVIDIA H100 80GB HBM3"), ("1", "NVIDIA L4")]
        assert (gpus[0]["utilization"], gpus[0]["memory_used_bytes"], gpus[0]["memory_total_bytes"]) == (
            0.5, 10 * 2**30, 80 * 2**30)  # fmt: skip
        nvml.driver_loaded = False  # NVML gone: no rows, as /metrics says governor_gpu_available 0
        seen = gpu.rounds
        async with asyncio.timeout(10):
            while gpu.rounds < seen + 2:
                await asyncio.sleep(0.01)
        assert (await reader.snapshot())["gpus"] == []
    finally:
        gpu.close()
