"""The web page's routes over HTTP (fake engine): off switch, the key on its data calls, headers, no CORS,
the static files' weight, and the eval call against `governor eval report`'s own numbers."""

from __future__ import annotations

import gzip
from pathlib import Path

import httpx
import pytest

from governor.api.ui_routes import STATIC
from governor.eval import loops as ev
from governor.eval import report
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
    bomb = gzip.compress(b"\n" * (300 * 1024 * 1024))
    r = await gw.client.post("/ui/api/eval", content=bomb)
    assert r.status_code == 413, r.text


async def test_status_lists_adapters_without_server_paths(gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await gateway(admin_key="admin")
    admin = {"Authorization": "Bearer admin"}
    r = await gw.client.post("/admin/adapters", headers=admin, json={"name": "broken", "path": "missing"})
    assert r.status_code == 404, r.text
    # The admin API names the adapters root (its operator fixes the folder); the page's status does not.
    (listed,) = (await gw.client.get("/admin/adapters", headers=admin)).json()["data"]
    assert str(tmp_path) in listed["reason"]
    status = (await gw.client.get("/ui/api/status")).json()
    (row,) = status["adapters"]
    assert (row["name"], row["state"], row["tier"], row["pinned"]) == ("broken", "failed", "registry", False)
    assert "does not exist under the adapters root (<path>)" in row["reason"] and "path" not in row
    assert str(tmp_path) not in httpx.Response(200, json=status).text
