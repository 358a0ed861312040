"""Adapter profiles (governor.json) are compiled when the adapter loads: a bad one fails the adapter with
the reason, once; a good one shapes every request to the adapter."""

from __future__ import annotations

import json
from pathlib import Path

from tests.api.conftest import ADMIN, GatewayFactory, chat_body
from tests.lora.factory import AdapterFactory, edit_config
from tests.lora.fixtures import factory  # noqa: F401

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def adapter_with_profile(factory: AdapterFactory, root: Path, name: str, profile: dict[str, object]) -> None:  # noqa: F811
    factory.copy("good", root / name)
    edit_config(root / name, base_model_name_or_path="fake-model")  # the fake engine's base
    (root / name / "governor.json").write_text(json.dumps(profile))


async def test_bad_profile_fails_the_adapter_at_load(gateway: GatewayFactory, factory: AdapterFactory) -> None:  # noqa: F811
    gw = await gateway(admin_key=ADMIN)
    adapter_with_profile(factory, gw.settings.adapters_dir, "bad", {"preset": "no-such-preset"})
    r = await gw.client.post("/admin/adapters", json={"name": "bad", "path": "bad"}, headers=AUTH)
    assert r.status_code == 400 and "governor.json" in r.json()["error"]["message"], r.text
    listed = {x["name"]: x for x in (await gw.client.get("/admin/adapters", headers=AUTH)).json()["data"]}
    assert listed["bad"]["state"] == "failed" and "no-such-preset" in listed["bad"]["reason"]
    assert "bad" not in gw.fake.loaded  # refused before the engine saw it
    r = await gw.client.post("/v1/chat/completions", json=chat_body(model="bad"))
    assert r.status_code == 409 and "no-such-preset" in r.json()["error"]["message"]


async def test_good_profile_applies_to_requests(gateway: GatewayFactory, factory: AdapterFactory) -> None:  # noqa: F811
    gw = await gateway(admin_key=ADMIN)
    adapter_with_profile(factory, gw.settings.adapters_dir, "good", {"preset": "off", "stop": ["### End"]})
    r = await gw.client.post("/admin/adapters", json={"name": "good", "path": "good"}, headers=AUTH)
    assert r.status_code == 200, r.text
    r = await gw.client.post("/v1/chat/completions", json=chat_body(model="good"))
    assert r.status_code == 200, r.text
    sent = gw.fake.requests[-1]
    assert "### End" in sent["stop"] and "vllm_xargs" not in sent  # the profile's stop, its preset 'off'
