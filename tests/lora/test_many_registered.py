"""A thousand adapters registered in one gateway (the fake engine over real HTTP): all listed with their
tier, any of them served on demand, and a restart restores every one without loading them all.
How fast /v1/models and /metrics answer then, and the memory it costs: loadtests/many_adapters.py."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from tests.api.conftest import ADMIN, GatewayFactory, gateway  # noqa: F401
from tests.lora.factory import base_model, edit_config, require_base

COUNT = 1000
SLOTS = 8


@functools.cache
def tiny_adapter(workdir: Path) -> Path:
    """A real peft adapter of ~5 KB: rank 1 on one projection of the first layer (random weights)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj"], layers_to_transform=[0],
                        init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(base_model(), config)
    dest = workdir / "tiny-one"
    peft_model.save_pretrained(str(dest))
    peft_model.unload()
    edit_config(dest, base_model_name_or_path="fake-model")  # the fake engine's served name
    return dest


def drop(root: Path, source: Path, count: int) -> list[str]:
    names = [f"m-{i:04d}" for i in range(count)]
    for name in names:
        shutil.copytree(source, root / name)
    return names


async def test_a_thousand_registered_listed_served_and_restored_without_loading_all(
    gateway: GatewayFactory,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    require_base()
    source = tiny_adapter(tmp_path_factory.mktemp("tiny"))
    settings = {"admin_key": ADMIN, "max_loras": 2, "max_cpu_loras": SLOTS}
    gw = await gateway(**settings)
    names = drop(gw.settings.adapters_dir, source, COUNT)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for name in names:  # registered only: nothing is read but the folder's existence
        r = await gw.client.post("/admin/adapters", json={"name": name, "path": name, "load": False}, headers=admin)
        assert r.status_code == 200 and r.json()["state"] == "discovered", r.text
    assert gw.fake.loaded == {}

    cards = (await gw.client.get("/v1/models")).json()["data"]
    listed = {c["id"]: (c["state"], c["tier"]) for c in cards if c["id"] != "fake-model"}
    assert listed == dict.fromkeys(names, ("discovered", "registry"))
    metrics = (await gw.client.get("/metrics")).text
    assert metrics.count('tier="registry"') == COUNT

    # Any of them serves on first use; more than SLOTS in turn evict the least recently used.
    for name in names[:: COUNT // (SLOTS + 4)]:
        body = {"model": name, "prompt": "hi", "max_tokens": 2}
        r = await gw.client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
    assert len(gw.fake.loaded) == SLOTS
    saved = json.loads((gw.settings.state_dir / "adapters.json").read_text())["adapters"]
    assert {e["name"] for e in saved} == set(names)

    # A restart (a new gateway on the same state) knows all of them and loads at most the engine's slots.
    again = await gateway(**settings)
    cards = (await again.client.get("/v1/models")).json()["data"]
    assert {c["id"] for c in cards} >= set(names)
    assert len(again.fake.loaded) <= SLOTS
    r = await again.client.post("/v1/completions", json={"model": names[-1], "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
