"""Adapters from an object store through the registry: a real S3 API (moto's server on 127.0.0.1) and the
fake engine over real HTTP. Fetched on first use, validated and staged like a dropped folder, a new upload
picked up at the next load, a bad object refused with the folder's 4xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from governor.errors import InvalidRequest
from tests.lora.factory import AdapterFactory
from tests.lora.fixtures import Engine
from tests.lora.test_objects import upload
from tests.lora.test_registry import Make


async def test_adapter_from_s3_is_fetched_served_and_replaced(
    make_registry: Make,
    engine: Engine,
    factory: AdapterFactory,
    s3: Any,
    bucket: str,
) -> None:
    upload(s3, bucket, "team/tuned", factory.golden("good"))
    registry = make_registry()
    await registry.start()
    url = f"s3://{bucket}/team/tuned"
    info = await registry.load("tuned", url, now=False)  # registered only: nothing fetched yet
    assert info["state"] == "discovered" and engine.fake.loaded == {}
    target = await registry.target("tuned")  # first use: fetched, validated, staged, loaded
    assert target is not None and target.upstream_model == "tuned"
    target.done()
    staged = Path(engine.fake.loaded["tuned"])
    weights = (factory.golden("good") / "adapter_model.safetensors").read_bytes()
    assert (staged / "adapter_model.safetensors").read_bytes() == weights
    first = registry.list()[0]["source_version"]
    assert first and "adapter_model.safetensors=" in first

    upload(s3, bucket, "team/tuned", factory.golden("good2"))  # a new push in the store
    info = await registry.load("tuned", url)
    assert info["version"] == 2 and info["source_version"] != first
    new_weights = (factory.golden("good2") / "adapter_model.safetensors").read_bytes()
    assert (Path(engine.fake.loaded["tuned@2"]) / "adapter_model.safetensors").read_bytes() == new_weights


@pytest.mark.parametrize("kind", ["pickle", "rank32"])
async def test_bad_object_gets_the_same_refusal_as_a_dropped_folder(
    make_registry: Make,
    engine: Engine,
    factory: AdapterFactory,
    root: Path,
    s3: Any,
    bucket: str,
    kind: str,
) -> None:
    source = factory.copy("good" if kind == "pickle" else "rank32", root / "bad")
    if kind == "pickle":
        (source / "adapter_model.bin").write_bytes(b"not really")
    upload(s3, bucket, "team/bad", source)
    registry = make_registry(max_lora_rank=16)
    await registry.start()
    with pytest.raises(InvalidRequest) as from_folder:
        await registry.load("bad", "bad")
    with pytest.raises(InvalidRequest) as from_store:
        await registry.load("bad-s3", f"s3://{bucket}/team/bad")
    assert (from_store.value.status, from_store.value.param) == (from_folder.value.status, from_folder.value.param)
    word = "pickle" if kind == "pickle" else "rank"
    assert word in from_store.value.message and word in from_folder.value.message
    assert engine.fake.loaded == {}
