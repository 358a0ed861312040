"""Shared by the fuzz tests and loadtests/fuzz.py: a Governor in front of the fake engine, and the fuzz
harness (schemathesis, positive and negative modes) with its response checks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from governor.engine.process import free_port

ADMIN = "fuzz-admin"
PROCESSES: dict[str, subprocess.Popen[bytes]] = {}  # url -> the governor process, for signal tests
ENGINES: dict[str, str] = {}  # url -> the fake engine's URL behind it, to call it directly


@contextmanager
def fake_backed_governor(delay: float = 0.0, **env: str) -> Iterator[str]:
    """`governor serve` (a real process) in front of the zero-latency fake engine; yields its URL."""
    fake_port, port = free_port(), free_port()
    scratch = Path(tempfile.mkdtemp(prefix="governor-fuzz-"))
    (scratch / "adapters").mkdir()
    fake = subprocess.Popen([sys.executable, "-m", "governor.bench.fake_engine", str(fake_port), str(delay)])
    full = {**os.environ, "GOVERNOR_ENGINE_URL": f"http://127.0.0.1:{fake_port}", "GOVERNOR_PORT": str(port),
            "GOVERNOR_WATCH_ADAPTERS": "false", "GOVERNOR_ADMIN_KEY": ADMIN, "GOVERNOR_DRAIN_SECONDS": "0",
            "GOVERNOR_LOG_LEVEL": "error", "GOVERNOR_ADAPTERS_DIR": str(scratch / "adapters"),
            "GOVERNOR_STATE_DIR": str(scratch / "state"), **env}  # fmt: skip
    gw = subprocess.Popen([sys.executable, "-m", "governor", "serve"], env=full)
    url = f"http://127.0.0.1:{port}"
    PROCESSES[url] = gw
    ENGINES[url] = f"http://127.0.0.1:{fake_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or gw.poll() is not None:
                raise RuntimeError("fake-backed governor did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        for proc in (gw, fake):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        PROCESSES.pop(url, None)
        ENGINES.pop(url, None)
        shutil.rmtree(scratch, ignore_errors=True)


MODES = ("positive", "negative")
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def app_schema(admin_key: str = ADMIN) -> dict[str, Any]:
    """Governor's OpenAPI schema, from an app built in this process: /openapi.json is off by default."""
    from governor.runtime.app import create_app
    from governor.runtime.bootstrap import build_policy, build_pool, build_registry
    from governor.settings import Settings

    scratch = Path(tempfile.mkdtemp(prefix="governor-schema-"))
    logging.disable(logging.WARNING)  # "degraded without the model's files": true, and beside the point here
    try:
        settings = Settings(engine_url=["http://127.0.0.1:9"], admin_key=admin_key, watch_adapters=False,
                            adapters_dir=scratch / "adapters", state_dir=scratch / "state")  # fmt: skip
        pool, model_dir = build_pool(settings)  # nothing starts: the schema only needs the routes
        policy = build_policy(settings, model_dir)
        app = create_app(settings, pool, policy, build_registry(settings, pool, model_dir, policy))
        return app.openapi()
    finally:
        logging.disable(logging.NOTSET)
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class FuzzReport:
    """What a fuzz run sent and got; `violations` lists every broken rule (none expected)."""

    cases: Counter[str] = field(default_factory=Counter)  # "<mode> <METHOD> <path>" -> cases
    statuses: Counter[str] = field(default_factory=Counter)  # "<mode> <status>" -> responses
    negative_bodies: int = 0  # negative cases whose generation body broke the schema
    negative_rejected: int = 0  # ... and were answered 4xx
    accepted: list[str] = field(default_factory=list)  # negative bodies answered 2xx (with why schemathesis broke them)
    violations: list[str] = field(default_factory=list)

    def total(self, mode: str | None = None) -> int:
        return sum(n for label, n in self.cases.items() if mode is None or label.startswith(mode + " "))

    def summary(self) -> str:
        lines = [f"schemathesis: {self.total()} cases ({self.total('positive')} positive, "
                 f"{self.total('negative')} negative), {len(self.violations)} violations"]  # fmt: skip
        lines.append("statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())))
        lines.append(f"negative generation bodies: {self.negative_bodies}, answered 4xx: {self.negative_rejected}")
        lines += [f"  {label}: {n}" for label, n in sorted(self.cases.items())]
        lines += [f"  accepted: {a}" for a in self.accepted[:10]]
        lines += [f"  VIOLATION: {v}" for v in self.violations[:20]]
        return "\n".join(lines)


def envelope_problem(body: Any) -> str | None:
    """Why `body` is not exactly the OpenAI error envelope, or None."""
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)):
        return f"not an error envelope: {body!r:.300}"
    if set(body["error"]) != {"message", "type", "param", "code"} or not body["error"]["message"]:
        return f"envelope fields: {body!r:.300}"
    return None


def response_problem(status: int, body: Any, content_type: str) -> str | None:
    """No 5xx; every error, in a body or inside a stream, is exactly the OpenAI envelope."""
    if status >= 500:
        return f"{status}: {body!r:.300}"
    if status >= 400:
        return envelope_problem(body)
    if content_type.startswith("text/event-stream") and isinstance(body, str):
        events = [part[6:] for part in body.split("\n\n") if part.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream without [DONE]: {body[-300:]!r}"
        for payload in events[:-1]:
            obj = json.loads(payload)
            if "error" in obj and (problem := envelope_problem(obj)):
                return "in stream: " + problem
    return None


def tame(body: Any, cap: int = 16) -> None:
    """Keep generated generation requests short against a real engine (validity unchanged)."""
    if not isinstance(body, dict):
        return
    for name, most in (("max_tokens", cap), ("max_completion_tokens", cap), ("min_tokens", cap), ("n", 2),
                       ("best_of", 2)):  # fmt: skip
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > most:
            body[name] = most
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 2:
        body["prompt"] = prompt[:2]


def _negative_body(case: Any) -> bool:
    from schemathesis.core.parameters import ParameterLocation

    info = case.meta.components.get(ParameterLocation.BODY) if case.meta else None
    return info is not None and info.mode.is_negative


def _why(case: Any) -> str:
    data = case.meta.phase.data if case.meta else None
    return str(getattr(data, "description", "") or "").replace("\n", " ")[:200]


def fuzz_all_operations(
    url: str,
    examples: int,
    *,
    model: str | None = None,
    cap_generation: bool = False,
    modes: tuple[str, ...] = MODES,
    admin_key: str = ADMIN,
    schema: dict[str, Any] | None = None,
) -> FuzzReport:
    """Up to `examples` schemathesis cases per operation and mode against a running Governor.

    Positive cases follow the schema (half of the generation requests name `model`, so that they reach the
    engine); negative cases break it (wrong types, bounds, missing fields, bytes that are not JSON). Every
    answer: no 5xx, errors (also inside streams) exactly the OpenAI envelope, and a generation body that
    breaks the schema is refused with a 4xx. Driven through hypothesis directly: schemathesis's pytest
    plugin does not load under pytest 9."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.core.result import Err

    loaded = schemathesis.openapi.from_dict(schema if schema is not None else app_schema(admin_key))
    report = FuzzReport()

    def runner(label: str, strategy: Any, generation: bool) -> Any:
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)  # fmt: skip
        @given(case=strategy)
        def run(case: Any) -> None:
            report.cases[label] += 1
            negative = generation and _negative_body(case)
            if generation and not negative and model and isinstance(case.body, dict) and report.cases[label] % 2:
                case.body["model"] = model
            if cap_generation:
                tame(case.body)
            auth = {"Authorization": f"Bearer {admin_key}"} if case.path.startswith("/admin") else {}
            response = case.call(base_url=url, headers=auth, timeout=120)
            content_type = response.headers.get("content-type") or ""
            content_type = content_type[0] if isinstance(content_type, list) else content_type  # a list in 4.x
            try:
                body: Any = response.json() if content_type.startswith("application/json") else response.text
            except ValueError:
                body = response.text
            mode = label.split(" ", 1)[0]
            report.statuses[f"{mode} {response.status_code}"] += 1
            problem = response_problem(response.status_code, body, content_type)
            if problem:
                report.violations.append(f"{label}: {problem} (request {case.body!r:.200})")
            if negative:
                report.negative_bodies += 1
                if 400 <= response.status_code < 500:
                    report.negative_rejected += 1
                else:
                    report.accepted.append(f"{label} {response.status_code}: {_why(case)} {case.body!r:.200}")

        return run

    for result in loaded.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        generation = operation.method.upper() == "POST" and operation.path in GENERATION_PATHS
        for mode in modes:
            label = f"{mode} {operation.method.upper()} {operation.path}"
            report.cases[label] = 0
            try:
                runner(label, operation.as_strategy(generation_mode=GenerationMode(mode)), generation)()
            except Unsatisfiable:
                pass  # nothing in this operation can break its schema (no body, no constrained parameter)
    return report
