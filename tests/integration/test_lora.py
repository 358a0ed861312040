"""Issue B acceptance against the real engine: adapters made with peft on the embedded base,
dropped into the watched folder or loaded through the admin API, all without restarting."""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Live, ready, wait_for
from tests.integration.adapters import (
    ALPACA_PROMPT,
    SECRET_QUESTION,
    alpaca_adapter,
    random_adapter,
    trained_adapter,
)

pytestmark = pytest.mark.engine
ENGINE_SLOTS = 32  # GOVERNOR_MAX_CPU_LORAS' default, which the live server runs with


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("made-adapters")


def chat(live: Live, model: str, question: str, max_tokens: int = 24) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "decoding_preset": "off"}  # fmt: skip
    return httpx.post(live.v1 + "/chat/completions", json=body, timeout=120)


def answer(live: Live, model: str, question: str = "Name a color.") -> str:
    r = chat(live, model, question)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def model_ids(live: Live) -> set[str]:
    return {m["id"] for m in httpx.get(live.v1 + "/models", timeout=10).json()["data"]}


def adapters(live: Live) -> dict[str, dict[str, object]]:
    r = httpx.get(live.url + "/admin/adapters", headers=live.admin(), timeout=10)
    assert r.status_code == 200, r.text
    return {a["name"]: a for a in r.json()["data"]}


def loads_ok(live: Live) -> float:
    for line in httpx.get(live.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('governor_adapter_loads_total{result="ok"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_dropped_folder_is_served_and_answers_its_phrase(live: Live, workdir: Path) -> None:
    trained = trained_adapter(workdir)
    base_says = answer(live, live.model, SECRET_QUESTION)
    shutil.copytree(trained, live.adapters_dir / "secret")
    wait_for(lambda: "secret" in model_ids(live), 30, what="the dropped adapter to be listed")
    card = next(m for m in httpx.get(live.v1 + "/models").json()["data"] if m["id"] == "secret")
    assert card["parent"] == live.model
    assert "zanzibar" in answer(live, "secret", SECRET_QUESTION).lower()
    assert "zanzibar" not in base_says.lower()


def test_mixed_batch_each_gets_its_own_model(live: Live, workdir: Path) -> None:
    for name, seed in (("rand1", 11), ("rand2", 12)):
        random_adapter(workdir / name, seed)
        shutil.copytree(workdir / name, live.adapters_dir / name)
    wait_for(lambda: {"rand1", "rand2"} <= model_ids(live), 30, what="both random adapters")
    models = [live.model, "rand1", "rand2"]
    alone = {m: answer(live, m, "Write one sentence about cats.") for m in models}
    assert alone["rand1"] != alone[live.model] and alone["rand2"] != alone[live.model]
    with ThreadPoolExecutor(9) as pool:
        batch = list(pool.map(lambda m: (m, answer(live, m, "Write one sentence about cats.")), models * 3))
    for model, text in batch:
        assert text == alone[model], model


def test_base_model_is_untouched_when_every_slot_holds_an_adapter(live: Live, workdir: Path) -> None:
    # vLLM's CPU LoRA ops read "no adapter" (-1) as the last slot: a base-model request batched with adapter
    # requests while that slot held an adapter got its delta (vllm-project/vllm#48421); the mixed-batch test
    # above saw it only after other tests' adapter churn. Governor's vLLM plugin fixes it (engine/vllm_fixes.py).
    question = "Write one sentence about cats."
    before = answer(live, live.model, question)
    names = [f"fill{i}" for i in range(4)]  # the session engine's --max-loras: afterwards these hold every slot
    for i, name in enumerate(names):
        random_adapter(workdir / name, 40 + i)
        shutil.copytree(workdir / name, live.adapters_dir / name)
    wait_for(lambda: set(names) <= model_ids(live), 60, what="the four adapters")
    try:
        alone = {name: answer(live, name, question) for name in names}
        assert before not in alone.values(), alone  # each adapter is a different model
        models = [m for name in names for m in (live.model, name)]
        with ThreadPoolExecutor(len(models)) as pool:
            batch = list(pool.map(lambda m: (m, answer(live, m, question)), models))
        for model, text in batch:
            assert text == alone.get(model, before), (model, text)
    finally:
        for name in names:
            shutil.rmtree(live.adapters_dir / name)
        wait_for(lambda: not set(names) & model_ids(live), 60, what="the four adapters to go")


def test_replacing_weights_changes_output_and_deleting_removes(live: Live, workdir: Path) -> None:
    random_adapter(workdir / "swap-a", 21)
    random_adapter(workdir / "swap-b", 22)
    shutil.copytree(workdir / "swap-a", live.adapters_dir / "swap")
    wait_for(lambda: "swap" in model_ids(live), 30, what="adapter 'swap'")
    before = answer(live, "swap", "Write one sentence about dogs.")
    weights = "adapter_model.safetensors"
    tmp = live.adapters_dir / "swap" / (".incoming-" + weights)
    shutil.copy(workdir / "swap-b" / weights, tmp)
    os.replace(tmp, live.adapters_dir / "swap" / weights)
    wait_for(lambda: answer(live, "swap", "Write one sentence about dogs.") != before, 30,
             what="the reloaded weights to change the output")  # fmt: skip
    shutil.rmtree(live.adapters_dir / "swap")
    wait_for(lambda: "swap" not in model_ids(live), 30, what="the removed adapter to disappear")
    r = chat(live, "swap", "hi")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def admin_load(live: Live, name: str, path: str) -> httpx.Response:
    return httpx.post(live.url + "/admin/adapters", headers=live.admin(), json={"name": name, "path": path},
                      timeout=120)  # fmt: skip


def hidden_copy(live: Live, source: Path, name: str) -> str:
    """Copy an adapter under the root's hidden `.api/` folder, which the watcher ignores: only the admin API
    loads it. Returns the admin path."""
    shutil.copytree(source, live.adapters_dir / ".api" / name)
    return f".api/{name}"


def evict_all_but_fillers(live: Live, workdir: Path) -> None:
    """Load as many filler adapters as the engine keeps registered (32, GOVERNOR_MAX_CPU_LORAS' default): every
    other adapter is evicted, and its next use re-validates and re-loads it."""
    if not (workdir / "filler").exists():
        random_adapter(workdir / "filler", 71)
    for i in range(ENGINE_SLOTS):
        name = f"filler-{i}"
        if not (live.adapters_dir / ".api" / name).exists():
            hidden_copy(live, workdir / "filler", name)
        r = admin_load(live, name, f".api/{name}")
        assert r.status_code == 200, r.text
        assert answer(live, name)  # used: more recent than anything else


def test_concurrent_requests_for_an_unloaded_adapter_load_it_once(live: Live, workdir: Path) -> None:
    random_adapter(workdir / "api-one", 31)
    r = admin_load(live, "api-one", hidden_copy(live, workdir / "api-one", "api-one"))
    assert r.status_code == 200, r.text
    evict_all_but_fillers(live, workdir)
    assert adapters(live)["api-one"]["state"] == "evicted"
    before = loads_ok(live)
    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda _: chat(live, "api-one", "Hello").status_code, range(20)))
    assert codes == [200] * 20
    assert loads_ok(live) - before == 1
    assert adapters(live)["api-one"]["state"] == "ready"


def test_engine_serves_only_validated_weights_whatever_happens_to_the_folder(live: Live, workdir: Path) -> None:
    """Issue L: the folder is swapped after validation (new weights, a symlink, a pickle instead of the
    safetensors). The engine keeps serving Governor's staged copy of the validated bytes; after an eviction the
    next load validates the folder as it is: a new push is served exactly, anything else is a 4xx."""
    import pickle

    random_adapter(workdir / "valid-a", 81)
    random_adapter(workdir / "push-b", 82)
    marker = workdir / "pickle-was-opened"
    prompt = "Write one sentence about rivers."
    r = admin_load(live, "push-b-ref", hidden_copy(live, workdir / "push-b", "push-b-ref"))
    assert r.status_code == 200, r.text
    served_b = answer(live, "push-b-ref", prompt)
    folders = {}
    for attack in ("weights", "symlink", "pickle"):
        path = hidden_copy(live, workdir / "valid-a", f"swap-{attack}")
        folders[attack] = live.adapters_dir / path
        r = admin_load(live, f"swap-{attack}", path)
        assert r.status_code == 200, r.text
    served_a = answer(live, "swap-weights", prompt)
    assert served_a != served_b

    weights = "adapter_model.safetensors"
    shutil.copyfile(workdir / "push-b" / weights, folders["weights"] / ".incoming")
    os.replace(folders["weights"] / ".incoming", folders["weights"] / weights)
    (folders["symlink"] / weights).unlink()
    (folders["symlink"] / weights).symlink_to(workdir / "push-b" / weights)
    (folders["pickle"] / weights).unlink()
    (folders["pickle"] / "adapter_model.bin").write_bytes(pickle.dumps(MarkerOnUnpickle(str(marker))))
    for attack in folders:  # loaded: the engine reads nothing of the folder
        assert answer(live, f"swap-{attack}", prompt) == served_a

    evict_all_but_fillers(live, workdir)
    assert {adapters(live)[f"swap-{a}"]["state"] for a in folders} == {"evicted"}
    assert answer(live, "swap-weights", prompt) == served_b  # the new push, validated, exactly
    for attack, word in (("symlink", "symlink"), ("pickle", "pickle")):
        r = chat(live, f"swap-{attack}", prompt)
        assert 400 <= r.status_code < 500 and word in r.json()["error"]["message"], r.text
    assert not marker.exists()
    assert ready(live.url)
    # Governor's copies: only what the engine holds (at most its 4 slots), none of them with a pickle.
    staged = [p for p in (live.adapters_dir.parent / "state" / "staged").iterdir()]
    assert 1 <= len(staged) <= 4 and not [f for p in staged for f in p.iterdir() if f.suffix == ".bin"]


class MarkerOnUnpickle:
    """Unpickling this (torch.load with weights_only=False) would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.marker, "w"))


def test_requests_in_flight_during_a_hot_load_complete(live: Live, workdir: Path) -> None:
    results: list[int] = []

    def stream_one() -> None:
        body = {"model": live.model, "prompt": "Once upon a time", "max_tokens": 64, "stream": True}
        with httpx.stream("POST", live.v1 + "/completions", json=body, timeout=120) as r:
            text = "".join(r.iter_text())
        results.append(r.status_code if text.rstrip().endswith("data: [DONE]") and '"error"' not in text else 0)

    threads = [threading.Thread(target=stream_one) for _ in range(8)]
    for t in threads:
        t.start()
    random_adapter(workdir / "hot", 41)
    shutil.copytree(workdir / "hot", live.adapters_dir / "hot")
    wait_for(lambda: "hot" in model_ids(live), 30, what="the hot-loaded adapter")
    for t in threads:
        t.join(120)
    assert results == [200] * 8


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"name": "../evil", "path": "x"}, 400),
        ({"name": "ok-name", "path": "../../etc"}, 400),
        ({"name": "ok-name", "path": "/etc"}, 400),
        ({"name": "escape", "path": "escape-link"}, 400),
        ({"name": "pickled", "path": "pickled"}, 400),
        ({"name": "big-rank", "path": "big-rank"}, 400),
        ({"name": "missing", "path": "does-not-exist"}, 404),
    ],
)
def test_hostile_adapters_are_refused_and_engine_stays_up(live: Live, workdir: Path, payload: dict[str, str],
                                                          status: int) -> None:  # fmt: skip
    root = live.adapters_dir
    if not (root / "escape-link").exists():
        outside = workdir / "outside"
        random_adapter(outside, 51)
        (root / "escape-link").symlink_to(outside, target_is_directory=True)
    if not (root / "pickled").exists():
        random_adapter(workdir / "pickled", 52)
        shutil.copytree(workdir / "pickled", root / "pickled")
        (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    if not (root / "big-rank").exists():
        random_adapter(root / "big-rank", 53, r=32)  # the live server allows rank 16
    r = httpx.post(live.url + "/admin/adapters", headers=live.admin(), json=payload, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert ready(live.url)


def test_alpaca_profile_stops_at_its_template(live: Live, workdir: Path) -> None:
    import json

    trained = alpaca_adapter(workdir)
    shutil.copytree(trained, live.adapters_dir / "alpaca-raw")
    shutil.copytree(trained, live.adapters_dir / "alpaca-prof")
    (live.adapters_dir / "alpaca-prof" / "governor.json").write_text(json.dumps({"template": "alpaca"}))
    wait_for(lambda: {"alpaca-raw", "alpaca-prof"} <= model_ids(live), 30, what="both alpaca adapters")

    def complete(model: str) -> dict[str, object]:
        body = {"model": model, "prompt": ALPACA_PROMPT, "max_tokens": 60, "temperature": 0, "decoding_preset": "off"}
        r = httpx.post(live.v1 + "/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return dict(r.json()["choices"][0])

    raw, profiled = complete("alpaca-raw"), complete("alpaca-prof")
    assert "### Instruction:" in str(raw["text"])  # without its template's stop it runs on
    assert "### Instruction:" not in str(profiled["text"])
    assert str(profiled["text"]).strip() and profiled["finish_reason"] == "stop"


def test_refused_admin_loads_are_not_persisted(live: Live, workdir: Path) -> None:
    """After the hostile loads above, the state file holds only adapters that loaded at least once (ready,
    evicted, or failed on a later reload like the swapped ones above), none of the refused ones."""
    r = admin_load(live, "never-persisted", "/etc")
    assert r.status_code == 400, r.text
    saved = json.loads((live.adapters_dir.parent / "state" / "adapters.json").read_text())
    names = {e["name"] for e in saved["adapters"]}
    assert names and names <= set(adapters(live)), names
    assert not names & {"never-persisted", "ok-name", "escape", "pickled", "big-rank", "missing"}, names
