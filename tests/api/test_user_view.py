"""What a user key sees (issue 28, finding 7): no server path in /v1 errors or model cards (the admin key
still sees them), and the engine's prefix cache salted per key by default."""

from __future__ import annotations

import re

from tests.api.conftest import ADMIN, USER, GatewayFactory, chat_body
from tests.api.test_request_path import bearer

ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?!v1/|admin/)[\w.-]+/")


async def test_v1_errors_name_no_server_path(gateway: GatewayFactory) -> None:
    gw = await gateway(api_keys=USER, admin_key=ADMIN)
    root = gw.settings.adapters_dir.resolve()
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{}")
    for name, path in (("ghost", "ghost"), ("broken", str(root / "broken"))):
        admin = await gw.client.post("/admin/adapters", json={"name": name, "path": path}, headers=bearer(ADMIN))
        assert admin.status_code in (400, 404) and str(root) in admin.text  # the operator sees where
        for key in (USER, ADMIN):  # /v1 is for clients whichever key they hold
            r = await gw.client.post("/v1/chat/completions", json=chat_body(model=name), headers=bearer(key))
            message = r.json()["error"]["message"]
            assert r.status_code == 409 and f"'{name}' failed to load" in message, r.text
            assert str(root) not in message and not ABSOLUTE_PATH.search(message), message


async def test_models_hide_merge_paths_from_user_keys(gateway: GatewayFactory) -> None:
    gw = await gateway(api_keys=USER, admin_key=ADMIN)
    gw.app.state.catalog.provenance = {
        "base_model": "SmolLM2-135M-Instruct", "base_path": "/srv/models/smollm2", "adapter": "support",
        "adapter_path": "/srv/adapters/support", "adapter_sha256": "ab" * 32, "adapter_rank": 8, "dtype": "float32",
        "merged_at": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip
    for path in ("/v1/models", "/v1/models/fake-model"):
        user = await gw.client.get(path, headers=bearer(USER))
        assert user.status_code == 200 and "/srv/" not in user.text, user.text
        admin = await gw.client.get(path, headers=bearer(ADMIN))
        assert "/srv/models/smollm2" in admin.text and "/srv/adapters/support" in admin.text
    (card,) = [c for c in (await gw.client.get("/v1/models", headers=bearer(USER))).json()["data"]]
    assert card["governor_merge"]["adapter"] == "support" and card["governor_merge"]["adapter_rank"] == 8


async def test_prefix_cache_is_salted_per_key_by_default(gateway: GatewayFactory) -> None:
    other = "other-user-key"
    gw = await gateway(api_keys=f"{USER},{other}")
    salts = []
    for key in (USER, other, USER):
        r = await gw.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(key))
        assert r.status_code == 200, r.text
        salts.append(gw.fake.requests[-1].get("cache_salt"))
    assert salts[0] and salts[0] == salts[2] != salts[1]
    assert not any(key in str(salt) for key in (USER, other) for salt in salts)  # a hash, not the key
    off = await gateway(api_keys=f"{USER},{other}", cache_salt_per_key=False)
    await off.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(USER))
    assert "cache_salt" not in off.fake.requests[-1]


async def test_a_clients_own_salt_only_splits_its_keys_cache(gateway: GatewayFactory) -> None:
    # refused unless an operator allows it; then mixed into the key's salt, never used alone
    gw = await gateway(api_keys=USER, allow_fields="cache_salt")
    await gw.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(USER))
    keys_salt = gw.fake.requests[-1]["cache_salt"]
    for own in ("tenant-a", "tenant-b"):
        r = await gw.client.post("/v1/chat/completions", json=chat_body(cache_salt=own), headers=bearer(USER))
        assert r.status_code == 200, r.text
        salt = gw.fake.requests[-1]["cache_salt"]
        assert salt != own and salt != keys_salt and salt.startswith(keys_salt)
