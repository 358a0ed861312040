"""Issue B acceptance against the real engine: adapters made with peft on the embedded base,
dropped into the watched folder or loaded through the admin API, all without restarting. Each test places
its own adapters under names no other test uses and removes them after (tests/integration/placed.py)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
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
from tests.integration.placed import Placed, admin_load, model_ids, unique

pytestmark = pytest.mark.engine
ENGINE_SLOTS = 32  # GOVERNOR_MAX_CPU_LORAS' default, which the live server runs with


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("made-adapters")


def made(workdir: Path, name: str, seed: int, r: int = 8) -> Path:
    """A random adapter in the module's workdir, made once and copied by the tests that use it."""
    return workdir / name if (workdir / name).exists() else random_adapter(workdir / name, seed, r=r)


def chat(live: Live, model: str, question: str, max_tokens: int = 24) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "decoding_preset": "off"}  # fmt: skip
    return httpx.post(live.v1 + "/chat/completions", json=body, timeout=120)


def answer(live: Live, model: str, question: str = "Name a color.") -> str:
    r = chat(live, model, question)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def adapters(live: Live) -> dict[str, dict[str, object]]:
    r = httpx.get(live.url + "/admin/adapters", headers=live.admin(), timeout=10)
    assert r.status_code == 200, r.text
    return {a["name"]: a for a in r.json()["data"]}


def loads_ok(live: Live) -> float:
    for line in httpx.get(live.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('governor_adapter_loads_total{result="ok"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_dropped_folder_is_served_and_answers_its_phrase(live: Live, workdir: Path, placed: Placed) -> None:
    base_says = answer(live, live.model, SECRET_QUESTION)
    name = placed.drop(trained_adapter(workdir), unique("secret"))
    wait_for(lambda: name in model_ids(live), 30, what="the dropped adapter to be listed")
    card = next(m for m in httpx.get(live.v1 + "/models").json()["data"] if m["id"] == name)
    assert card["parent"] == live.model
    assert "zanzibar" in answer(live, name, SECRET_QUESTION).lower()
    assert "zanzibar" not in base_says.lower()


def test_mixed_batch_each_gets_its_own_model(live: Live, workdir: Path, placed: Placed) -> None:
    names = [placed.drop(made(workdir, f"rand{seed}", seed), unique("rand")) for seed in (11, 12)]
    wait_for(lambda: set(names) <= model_ids(live), 30, what="both random adapters")
    models = [live.model, *names]
    alone = {m: answer(live, m, "Write one sentence about cats.") for m in models}
    assert alone[names[0]] != alone[live.model] and alone[names[1]] != alone[live.model]
    with ThreadPoolExecutor(9) as pool:
        batch = list(pool.map(lambda m: (m, answer(live, m, "Write one sentence about cats.")), models * 3))
    for model, text in batch:
        assert text == alone[model], model


def test_base_model_is_untouched_when_every_slot_holds_an_adapter(live: Live, workdir: Path, placed: Placed) -> None:
    # vLLM's CPU LoRA ops read "no adapter" (-1) as the last slot: a base-model request batched with adapter
    # requests while that slot held an adapter got its delta (vllm-project/vllm#48421); the mixed-batch test
    # saw it only after other tests' adapter churn. Governor's vLLM plugin fixes it (engine/vllm_fixes.py).
    question = "Write one sentence about cats."
    before = answer(live, live.model, question)
    # the session engine's --max-loras: afterwards these hold every slot
    names = [placed.drop(made(workdir, f"fill{i}", 40 + i), unique(f"fill{i}")) for i in range(4)]
    wait_for(lambda: set(names) <= model_ids(live), 60, what="the four adapters")
    alone = {name: answer(live, name, question) for name in names}
    assert before not in alone.values(), alone  # each adapter is a different model
    models = [m for name in names for m in (live.model, name)]
    with ThreadPoolExecutor(len(models)) as pool:
        batch = list(pool.map(lambda m: (m, answer(live, m, question)), models))
    for model, text in batch:
        assert text == alone.get(model, before), (model, text)


def test_replacing_weights_changes_output_and_deleting_removes(live: Live, workdir: Path, placed: Placed) -> None:
    name = placed.drop(made(workdir, "swap-a", 21), unique("swap"))
    wait_for(lambda: name in model_ids(live), 30, what=f"adapter {name!r}")
    before = answer(live, name, "Write one sentence about dogs.")
    weights = "adapter_model.safetensors"
    tmp = live.adapters_dir / name / (".incoming-" + weights)
    shutil.copy(made(workdir, "swap-b", 22) / weights, tmp)
    os.replace(tmp, live.adapters_dir / name / weights)
    wait_for(lambda: answer(live, name, "Write one sentence about dogs.") != before, 30,
             what="the reloaded weights to change the output")  # fmt: skip
    shutil.rmtree(live.adapters_dir / name)
    wait_for(lambda: name not in model_ids(live), 30, what="the removed adapter to disappear")
    r = chat(live, name, "hi")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.fixture(scope="module")
def fillers(live: Live, workdir: Path) -> Iterator[list[str]]:
    """As many adapters as the engine keeps registered (32, GOVERNOR_MAX_CPU_LORAS' default), placed under
    `.api/` for the module and removed after it; `evict_all_but` loads and uses them."""
    placed, names = Placed(live), [unique(f"filler{i}") for i in range(ENGINE_SLOTS)]
    for name in names:
        placed.hide(made(workdir, "filler", 71), name)
    yield names
    placed.remove()


def evict_all_but(live: Live, fillers: list[str]) -> None:
    """Load and use every filler: every other adapter is evicted, and its next use re-validates and re-loads
    it."""
    for name in fillers:
        r = admin_load(live, name, f".api/{name}")
        assert r.status_code == 200, r.text
        r = chat(live, name, "Hi", max_tokens=1)  # used: more recent than anything else
        assert r.status_code == 200, r.text


def test_concurrent_requests_for_an_unloaded_adapter_load_it_once(live: Live, workdir: Path, placed: Placed,
                                                                  fillers: list[str]) -> None:  # fmt: skip
    name = unique("api-one")
    r = placed.load(made(workdir, "api-one", 31), name)
    assert r.status_code == 200, r.text
    evict_all_but(live, fillers)
    assert adapters(live)[name]["state"] == "evicted"
    before = loads_ok(live)
    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda _: chat(live, name, "Hello").status_code, range(20)))
    assert codes == [200] * 20
    assert loads_ok(live) - before == 1
    assert adapters(live)[name]["state"] == "ready"


def test_engine_serves_only_validated_weights_whatever_happens_to_the_folder(
    live: Live, workdir: Path, placed: Placed, fillers: list[str]
) -> None:
    """Issue L: the folder is swapped after validation (new weights, a symlink, a pickle instead of the
    safetensors). The engine keeps serving Governor's staged copy of the validated bytes; after an eviction the
    next load validates the folder as it is: a new push is served exactly, anything else is a 4xx."""
    import pickle

    valid_a, push_b = made(workdir, "valid-a", 81), made(workdir, "push-b", 82)
    marker = workdir / unique("pickle-was-opened")
    prompt = "Write one sentence about rivers."
    reference = unique("push-b-ref")
    r = placed.load(push_b, reference)
    assert r.status_code == 200, r.text
    served_b = answer(live, reference, prompt)
    names = {attack: unique(f"swap-{attack}") for attack in ("weights", "symlink", "pickle")}
    folders = {attack: live.adapters_dir / ".api" / name for attack, name in names.items()}
    for name in names.values():
        r = placed.load(valid_a, name)
        assert r.status_code == 200, r.text
    served_a = answer(live, names["weights"], prompt)
    assert served_a != served_b

    weights = "adapter_model.safetensors"
    shutil.copyfile(push_b / weights, folders["weights"] / ".incoming")
    os.replace(folders["weights"] / ".incoming", folders["weights"] / weights)
    (folders["symlink"] / weights).unlink()
    (folders["symlink"] / weights).symlink_to(push_b / weights)
    (folders["pickle"] / weights).unlink()
    (folders["pickle"] / "adapter_model.bin").write_bytes(pickle.dumps(MarkerOnUnpickle(str(marker))))
    for name in names.values():  # loaded: the engine reads nothing of the folder
        assert answer(live, name, prompt) == served_a

    evict_all_but(live, fillers)
    assert {adapters(live)[name]["state"] for name in names.values()} == {"evicted"}
    assert answer(live, names["weights"], prompt) == served_b  # the new push, validated, exactly
    for attack in ("symlink", "pickle"):
        r = chat(live, names[attack], prompt)
        assert 400 <= r.status_code < 500 and attack in r.json()["error"]["message"], r.text
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


def test_requests_in_flight_during_a_hot_load_complete(live: Live, workdir: Path, placed: Placed) -> None:
    results: list[int] = []

    def stream_one() -> None:
        body = {"model": live.model, "prompt": "Once upon a time", "max_tokens": 64, "stream": True}
        with httpx.stream("POST", live.v1 + "/completions", json=body, timeout=120) as r:
            text = "".join(r.iter_text())
        results.append(r.status_code if text.rstrip().endswith("data: [DONE]") and '"error"' not in text else 0)

    source = made(workdir, "hot", 41)
    threads = [threading.Thread(target=stream_one) for _ in range(8)]
    for t in threads:
        t.start()
    name = placed.drop(source, unique("hot"))
    wait_for(lambda: name in model_ids(live), 30, what="the hot-loaded adapter")
    for t in threads:
        t.join(120)
    assert results == [200] * 8


def hostile(placed: Placed, workdir: Path, kind: str) -> dict[str, str]:
    """An admin load request the gateway must refuse; the folder it names (if any) placed for this test."""
    if kind == "escape":  # a symlink out of the adapters root
        name = unique("escape")
        (placed.live.adapters_dir / ".api").mkdir(exist_ok=True)
        (placed.live.adapters_dir / ".api" / name).symlink_to(made(workdir, "outside", 51), target_is_directory=True)
        placed.hidden.append(name)
        return {"name": name, "path": f".api/{name}"}
    if kind == "pickled":  # a pickle beside the safetensors
        name = unique("pickled")
        path = placed.hide(made(workdir, "pickled", 52), name)
        (placed.live.adapters_dir / path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
        return {"name": name, "path": path}
    if kind == "big-rank":  # the live server allows rank 16
        name = unique("big-rank")
        return {"name": name, "path": placed.hide(made(workdir, "big-rank", 53, r=32), name)}
    return {
        "bad-name": {"name": "../evil", "path": "x"},
        "dotdot": {"name": "ok-name", "path": "../../etc"},
        "absolute": {"name": "ok-name", "path": "/etc"},
        "missing": {"name": "missing", "path": f".api/{unique('does-not-exist')}"},
    }[kind]


@pytest.mark.parametrize(
    ("kind", "status"),
    [("bad-name", 400), ("dotdot", 400), ("absolute", 400), ("escape", 400), ("pickled", 400), ("big-rank", 400),
     ("missing", 404)],
)  # fmt: skip
def test_hostile_adapters_are_refused_and_engine_stays_up(live: Live, workdir: Path, placed: Placed, kind: str,
                                                          status: int) -> None:  # fmt: skip
    r = httpx.post(live.url + "/admin/adapters", headers=live.admin(), json=hostile(placed, workdir, kind), timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert ready(live.url)


def test_alpaca_profile_stops_at_its_template(live: Live, workdir: Path, placed: Placed) -> None:
    trained = alpaca_adapter(workdir)
    raw, profiled = placed.drop(trained, unique("alpaca-raw")), unique("alpaca-prof")
    # the profile is written before the folder appears, so the watcher loads it complete
    staging = workdir / profiled
    shutil.copytree(trained, staging)
    (staging / "governor.json").write_text(json.dumps({"template": "alpaca"}))
    placed.drop(staging, profiled)
    wait_for(lambda: {raw, profiled} <= model_ids(live), 30, what="both alpaca adapters")

    def complete(model: str) -> dict[str, object]:
        body = {"model": model, "prompt": ALPACA_PROMPT, "max_tokens": 60, "temperature": 0, "decoding_preset": "off"}
        r = httpx.post(live.v1 + "/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return dict(r.json()["choices"][0])

    raw_choice, profiled_choice = complete(raw), complete(profiled)
    assert "### Instruction:" in str(raw_choice["text"])  # without its template's stop it runs on
    assert "### Instruction:" not in str(profiled_choice["text"])
    assert str(profiled_choice["text"]).strip() and profiled_choice["finish_reason"] == "stop"


def test_refused_admin_loads_are_not_persisted(live: Live, workdir: Path, placed: Placed) -> None:
    """The state file holds the adapter this test loaded and none of the ones it was refused."""
    good = unique("persisted")
    r = placed.load(made(workdir, "persisted", 54), good)
    assert r.status_code == 200, r.text
    refused = [hostile(placed, workdir, kind) for kind in ("pickled", "big-rank", "escape", "absolute")]
    refused.append({"name": unique("never-persisted"), "path": "/etc"})
    for payload in refused:
        r = admin_load(live, payload["name"], payload["path"])
        assert r.status_code == 400, r.text
    saved = json.loads((live.adapters_dir.parent / "state" / "adapters.json").read_text())
    names = {e["name"] for e in saved["adapters"]}
    assert good in names and names <= set(adapters(live)), names
    assert not names & {p["name"] for p in refused}, names
