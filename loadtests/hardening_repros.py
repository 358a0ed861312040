"""Issue 28's repros, run by hand against a live `governor serve`: each prints what came back and whether
it is the intended refusal. Start the server with keys, a token quota and a scratch adapters root, e.g.

    GOVERNOR_API_KEYS_FILE=keys GOVERNOR_ADMIN_KEY_FILE=admin GOVERNOR_KEY_TPM=300 \
    GOVERNOR_ADAPTERS_DIR=/tmp/repro-adapters governor serve --port 8011

then `python loadtests/hardening_repros.py --url http://127.0.0.1:8011 --api-key K --admin-key A
--adapters-dir /tmp/repro-adapters [--engine-socket PATH]`. Adapters are made here with peft on the
embedded model (tests/lora/factory.py); nothing is mocked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.lora.factory import base_model, save_adapter

RESULTS: list[tuple[str, bool, str]] = []


def check(finding: str, ok: bool, seen: str) -> None:
    RESULTS.append((finding, ok, seen))
    print(f"[{'refused as intended' if ok else 'NOT AS INTENDED'}] {finding}: {seen}", flush=True)


def make_adapter(root: Path, name: str, edit: Callable[[dict], object] | None = None) -> Path:
    dest = root / name
    if dest.exists():
        shutil.rmtree(dest)
    save_adapter(base_model(), dest, 8, ["q_proj", "v_proj"], seed=len(name))
    if edit is not None:
        config_path = dest / "adapter_config.json"
        config = json.loads(config_path.read_text())
        text = edit(config)
        config_path.write_text(text if isinstance(text, str) else json.dumps(config))
    return dest


def quota_hangups(gw: httpx.Client, model: str, max_tokens: int = 250, rounds: int = 20) -> None:
    """Finding 1: stream with preset off, read 90% of `max_tokens` events, hang up, repeat. The key's
    GOVERNOR_KEY_TPM must be a little above `max_tokens` (300 for 250) and refill slower than the engine
    streams (a token bucket refills at TPM / 60 per second): then a charge for what was relayed leaves too
    little for the next request (429), while a refunded hang-up leaves the bucket nearly full."""
    relayed, read, started = 0, max_tokens * 9 // 10, time.monotonic()
    body = {
        "model": model,
        "prompt": "Count: 1 2 3",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "decoding_preset": "off",
    }
    for i in range(rounds):
        with gw.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 429:
                seen = f"429 after {i} hang-ups, {relayed} tokens relayed in {time.monotonic() - started:.0f} s"
                check("1 quota after hang-ups", i > 0, seen)
                return
            events = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events += 1
                    if events >= read:
                        break
            relayed += events
        print(f"hang-up {i + 1}: {events} events read", flush=True)
    check("1 quota after hang-ups", False, f"no 429 after {rounds} hang-ups, {relayed} tokens relayed")


def admin_refusals(admin: httpx.Client, gw: httpx.Client, root: Path, base: str) -> None:
    """Findings 2, 4, 5, 6: configs and files the registry must refuse, without wedging or persisting them."""
    cases = {
        "2 catastrophic rank_pattern key": lambda c: c.update(rank_pattern={"(a+)+$": 4}),
        "2 catastrophic alpha_pattern key": lambda c: c.update(alpha_pattern={"(x|x?)+y": 4}),
        "2 unknown config field": lambda c: c.update(governor_unknown_field=1),
        "5 config nested 200,000 deep": lambda c: (
            json.dumps(c)[:-1] + ', "nested": ' + "[" * 200_000 + "]" * 200_000 + "}"
        ),
    }
    for label, edit in cases.items():
        name = "repro-" + label.split()[0] + str(abs(hash(label)) % 1000)
        make_adapter(root, name, edit)
        r = admin.post("/admin/adapters", json={"name": name, "path": name})
        use = gw.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1})
        check(
            label,
            400 <= r.status_code < 500 and use.status_code < 500,
            f"load {r.status_code} {r.json().get('error', {}).get('code')}; a request for it {use.status_code}",
        )
        admin.delete(f"/admin/adapters/{name}")
        shutil.rmtree(root / name, ignore_errors=True)

    make_adapter(root, "repro-good")
    first = admin.post("/admin/adapters", json={"name": "repro-good", "path": "repro-good"})
    make_adapter(root, "repro-bad", lambda c: c.update(governor_unknown_field=1))
    again = admin.post("/admin/adapters", json={"name": "repro-good", "path": "repro-bad"})
    shutil.rmtree(root / "repro-bad")
    listed = {a["name"]: a for a in admin.get("/admin/adapters").json()["data"]}
    kept = listed.get("repro-good", {}).get("path")
    check(
        "4 re-pointing a loaded adapter to a bad path",
        first.status_code == 200 and again.status_code >= 400 and kept == "repro-good",
        f"first {first.status_code}, re-point {again.status_code}, path kept: {kept}",
    )

    linked = root / "repro-linked"
    linked.mkdir(exist_ok=True)
    shutil.copy(root / "repro-good" / "adapter_config.json", linked)
    os.link(root / "repro-good" / "adapter_model.safetensors", linked / "adapter_model.safetensors")
    r = admin.post("/admin/adapters", json={"name": "repro-linked", "path": "repro-linked"})
    check("6 hard link into the adapters root", 400 <= r.status_code < 500, f"load {r.status_code} {r.text[:160]}")
    shutil.rmtree(linked)
    fifo = root / "repro-fifo"
    fifo.mkdir(exist_ok=True)
    shutil.copy(root / "repro-good" / "adapter_config.json", fifo)
    os.mkfifo(fifo / "adapter_model.safetensors")
    started = time.monotonic()
    r = admin.post("/admin/adapters", json={"name": "repro-fifo", "path": "repro-fifo"})
    check(
        "6 FIFO as the weights file",
        400 <= r.status_code < 500 and time.monotonic() - started < 30,
        f"load {r.status_code} in {time.monotonic() - started:.1f} s; /health {gw.get('/health').status_code}",
    )
    shutil.rmtree(fifo)
    admin.delete("/admin/adapters/repro-good")
    shutil.rmtree(root / "repro-good", ignore_errors=True)


def leaks(gw: httpx.Client, root: Path, model: str) -> None:
    """Finding 7: no server path in a user's view; no secret accepted on a command line."""
    r = gw.post("/v1/completions", json={"model": "no-such-adapter", "prompt": "Hi", "max_tokens": 1})
    models = gw.get("/v1/models").text
    leaked = [p for p in (str(root), str(root.resolve()), "base_path", "adapter_path") if p in r.text + models]
    check("7 server paths in /v1 answers", not leaked, f"{r.status_code}; leaked: {leaked or 'none'}")
    done = subprocess.run(
        [str(Path(sys.executable).with_name("governor")), "serve", "--admin-key", "s3cret"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    check("7 a key as a command-line flag", done.returncode != 0, (done.stderr or done.stdout).strip()[-160:])


def engine_routes(sock: str) -> None:
    """Finding 3: routes vLLM mounts beside /v1, asked over the engine's socket without its key."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=30) as engine:
        for method, path in (
            ("POST", "/adapters"),
            ("DELETE", "/adapters/x"),
            ("POST", "/invocations"),
            ("GET", "/metrics"),
            ("POST", "/tokenize"),
        ):
            r = engine.request(method, "http://engine" + path, json={"prompt": "Hi"})
            check(f"3 engine {method} {path} without the key", r.status_code == 401, str(r.status_code))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--admin-key", required=True)
    ap.add_argument("--adapters-dir", type=Path, required=True)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--engine-socket", default="")
    args = ap.parse_args()
    user = {"Authorization": f"Bearer {args.api_key}"}
    with (
        httpx.Client(base_url=args.url, headers=user, timeout=120) as gw,
        httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.admin_key}"}, timeout=120) as admin,
    ):
        admin_refusals(admin, gw, args.adapters_dir, args.model)
        leaks(gw, args.adapters_dir, args.model)
        if args.engine_socket:
            engine_routes(args.engine_socket)
        quota_hangups(gw, args.model)
        check("server alive after all of it", gw.get("/ready").status_code == 200, "/ready")
    failed = [f for f, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} as intended", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
