"""Locust users for any OpenAI-compatible server: Governor, or a plain vLLM with GOVERNOR_LT_GOVERNOR=0.

    locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000 -T base
    governor bench load --users 4 --run-time 60s --mix base    # the same, plus a summary and thresholds

Mixes are locust tags (`-T base loops`, LOCUST_TAGS, or GOVERNOR_LT_MIX=base,loops; default `base`):
  base      chat and completions, streaming and not, on the base model
  adapters  streaming chat spread over adapters, GOVERNOR_LT_ADAPTERS="a:3,b:1" (default: every adapter
            GET /v1/models lists, equal weights)
  loops     loop-prone prompts, greedy, half with decoding_preset GOVERNOR_LT_PRESET (balanced), half `off`
  long      prompts of ~GOVERNOR_LT_LONG_TOKENS (1500) tokens, streaming

Each user sends its next request as soon as the last one ends, so users = concurrency. Rows next to the
HTTP ones (whose times cover the whole request, stream included); they are fired for successes only:
  TTFT      time to the first output token, ms
  TPOT      (last output token time - first output token time) / (output tokens - 1), ms
  TOKENS/S  "response time" = the request's output tokens per second; "Average Content Size" = output
            tokens per request, so output tokens/s of the run = sum of Average Content Size x Requests/s
Output tokens come from the usage chunk (stream_options.include_usage) or the usage field. A stream that
ends without [DONE], or carries an error event, is a failure.

Settings, as flags or environment variables: --lt-model GOVERNOR_LT_MODEL (default: the first base model
of GET /v1/models), --lt-max-tokens GOVERNOR_LT_MAX_TOKENS (64), --lt-governor GOVERNOR_LT_GOVERNOR (1: send
Governor-only fields; 0 for a plain vLLM), --lt-preset GOVERNOR_LT_PRESET, --lt-adapters GOVERNOR_LT_ADAPTERS,
--lt-long-tokens GOVERNOR_LT_LONG_TOKENS, --lt-iterations GOVERNOR_LT_ITERATIONS (stop after N requests),
GOVERNOR_LT_API_KEY (bearer key; best kept out of the command line).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, events, tag, task
from locust.env import Environment
from locust.exception import StopUser
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper next to this file, however locust starts
import openai_traffic as traffic

log = logging.getLogger("governor.loadtest")
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


class RunState:
    """What test_start resolved (model, adapters) and the iteration budget; one per locust process."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cfg = traffic.TrafficConfig()
        self.adapters: list[tuple[str, float]] = []
        self.ready = False
        self.iterations = 0
        self.started = 0
        self.finished = 0
        self.quitting = False


RUN = RunState()


# flag, environment variable, type, default, help
_OPTIONS: tuple[tuple[str, str, type, Any, str], ...] = (
    ("--lt-model", "GOVERNOR_LT_MODEL", str, "", "Model to request (default: the first base model in /v1/models)."),
    ("--lt-max-tokens", "GOVERNOR_LT_MAX_TOKENS", int, 64, "max_tokens of every request."),
    ("--lt-governor", "GOVERNOR_LT_GOVERNOR", str, "1", "1: Governor (send decoding_preset); 0: plain vLLM."),
    ("--lt-preset", "GOVERNOR_LT_PRESET", str, "balanced", "decoding_preset of the loops mix (vs `off`)."),
    ("--lt-adapters", "GOVERNOR_LT_ADAPTERS", str, "", 'Adapter weights, "a:3,b:1" (default: all listed).'),
    ("--lt-long-tokens", "GOVERNOR_LT_LONG_TOKENS", int, 1500, "Approximate prompt tokens of the long mix."),
    ("--lt-iterations", "GOVERNOR_LT_ITERATIONS", int, 0, "Stop after this many requests in all (0: no cap)."),
    ("--lt-api-key", "GOVERNOR_LT_API_KEY", str, "", "Bearer key (prefer the environment variable)."),
)


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    for flag, env_var, kind, default, text in _OPTIONS:
        secret = flag == "--lt-api-key"
        parser.add_argument(flag, env_var=env_var, type=kind, default=default, help=text, is_secret=secret)
    # The mix is a set of tags; -T and LOCUST_TAGS still override this default.
    mix = os.environ.get("GOVERNOR_LT_MIX", "base").replace(",", " ").split()
    parser.set_defaults(tags=mix or ["base"])


def _get_json(url: str, headers: dict[str, str]) -> Any:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def _abort(environment: Environment, reason: str) -> None:
    log.error("load test not started: %s", reason)
    environment.process_exit_code = 2
    if environment.runner is not None:
        gevent.spawn_later(0, environment.runner.quit)


@events.test_start.add_listener
def _resolve(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    RUN.reset()  # the web UI can start several runs in one process
    if opts is None:
        _abort(environment, "start this file with the locust command (its options are needed)")
        return
    cfg = traffic.TrafficConfig(
        model=opts.lt_model, max_tokens=opts.lt_max_tokens, governor=traffic.parse_bool(opts.lt_governor),
        preset=opts.lt_preset, long_tokens=opts.lt_long_tokens, api_key=opts.lt_api_key,
    )  # fmt: skip
    mixes = set(opts.tags or [])
    try:
        adapters = traffic.parse_weights(opts.lt_adapters)
        if not cfg.model or ("adapters" in mixes and not adapters):
            host = (environment.host or "").rstrip("/")
            base, listed = traffic.split_models(_get_json(host + "/v1/models", cfg.headers()))
            cfg.model = cfg.model or base
            adapters = adapters or [(name, 1.0) for name in listed]
    except (OSError, ValueError) as exc:
        _abort(environment, f"could not resolve the model: {exc}")
        return
    if "adapters" in mixes and not adapters:
        _abort(environment, "the adapters mix needs adapters: set GOVERNOR_LT_ADAPTERS or load some")
        return
    RUN.cfg, RUN.adapters, RUN.iterations, RUN.ready = cfg, adapters, opts.lt_iterations, True
    log.info("model %s, mixes %s, max_tokens %d, adapters %s", cfg.model, sorted(mixes), cfg.max_tokens, adapters)


@events.quitting.add_listener
def _final_csv(environment: Environment, **_: Any) -> None:
    """Locust rewrites the --csv files once a second, not at exit: write the final numbers."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    table = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (("_stats.csv", table.requests_csv), ("_failures.csv", table.failures_csv)):
        with open(prefix + suffix, "w", newline="") as handle:
            write(csv.writer(handle))


def _http_error(resp: Any) -> str:
    if not resp.status_code:
        return f"connection error: {getattr(resp, 'error', None)!r}"
    try:
        body = json.loads(resp.content or b"{}")
        detail = traffic.error_text(body.get("error") or body)
    except (ValueError, AttributeError):
        detail = (resp.text or "")[:120]
    return f"HTTP {resp.status_code}: {detail}"


class OpenAIUser(FastHttpUser):
    """One client in a closed loop; the mixes are its tagged tasks."""

    network_timeout = 600.0  # a long prompt under load may wait minutes for its first token
    connection_timeout = 30.0

    def on_start(self) -> None:
        self.rng = random.Random()

    # -- base: the base model, both APIs, streaming and not
    @tag("base")
    @task(4)
    def base_chat_stream(self) -> None:
        body = traffic.chat_body(RUN.cfg, RUN.cfg.model, self.rng.choice(traffic.BASE_PROMPTS), True)
        self._stream("base chat stream", CHAT, body)

    @tag("base")
    @task(2)
    def base_completion_stream(self) -> None:
        body = traffic.completion_body(RUN.cfg, RUN.cfg.model, self.rng.choice(traffic.BASE_PROMPTS), True)
        self._stream("base completion stream", COMPLETIONS, body)

    @tag("base")
    @task(1)
    def base_chat(self) -> None:
        body = traffic.chat_body(RUN.cfg, RUN.cfg.model, self.rng.choice(traffic.BASE_PROMPTS), False)
        self._plain("base chat", CHAT, body)

    @tag("base")
    @task(1)
    def base_completion(self) -> None:
        body = traffic.completion_body(RUN.cfg, RUN.cfg.model, self.rng.choice(traffic.BASE_PROMPTS), False)
        self._plain("base completion", COMPLETIONS, body)

    # -- adapters: one row per adapter, so adapters can be compared
    @tag("adapters")
    @task(8)
    def adapters_chat_stream(self) -> None:
        names = [name for name, _ in RUN.adapters] or [RUN.cfg.model]
        weights = [weight for _, weight in RUN.adapters] or [1.0]
        model = self.rng.choices(names, weights)[0]
        body = traffic.chat_body(RUN.cfg, model, self.rng.choice(traffic.BASE_PROMPTS), True)
        self._stream(f"adapters chat stream [{model}]", CHAT, body)

    # -- loops: the configured preset against `off`, same prompts, greedy
    @tag("loops")
    @task(4)
    def loops_chat_stream(self) -> None:
        self._loop(RUN.cfg.preset)

    @tag("loops")
    @task(4)
    def loops_chat_stream_off(self) -> None:
        self._loop("off")

    def _loop(self, preset: str) -> None:
        prompt = self.rng.choice(traffic.LOOP_PROMPTS)
        body = traffic.chat_body(RUN.cfg, RUN.cfg.model, prompt, True, temperature=0, decoding_preset=preset)
        self._stream(f"loops chat stream [{preset}]" if RUN.cfg.governor else "loops chat stream", CHAT, body)

    # -- long: ~1.5k-token prompts (prefill-heavy)
    @tag("long")
    @task(4)
    def long_completion_stream(self) -> None:
        prompt = traffic.long_prompt(self.rng, RUN.cfg.long_tokens)
        self._stream(
            "long completion stream", COMPLETIONS, traffic.completion_body(RUN.cfg, RUN.cfg.model, prompt, True)
        )

    @tag("long")
    @task(4)
    def long_chat_stream(self) -> None:
        prompt = traffic.long_prompt(self.rng, RUN.cfg.long_tokens)
        self._stream("long chat stream", CHAT, traffic.chat_body(RUN.cfg, RUN.cfg.model, prompt, True))

    # -- plumbing
    def _stream(self, name: str, path: str, body: dict[str, Any]) -> None:
        self._begin()
        try:
            start = time.perf_counter()
            with self.client.post(path, json=body, headers=RUN.cfg.headers(), name=name, stream=True,
                                  catch_response=True) as resp:  # fmt: skip
                if resp.status_code != 200:
                    resp.failure(_http_error(resp))
                    return
                try:
                    # readline returns each line as it arrives; iter_content(n) would wait for n bytes.
                    lines = traffic.iter_lines(lambda: resp._response.readline(b"\n"))
                    outcome = traffic.measure_stream(lines, start)
                except Exception as exc:  # a reset or a parse error of the HTTP layer (not GreenletExit)
                    outcome = traffic.Outcome(error=f"stream broke: {exc!r}")
                # The HTTP row times the whole stream, not just the headers.
                resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
                resp.request_meta["response_length"] = outcome.nbytes
                if outcome.error:
                    resp.failure(outcome.error)
                    return
                resp.success()
            self._report(name, outcome)
        finally:
            self._end()

    def _plain(self, name: str, path: str, body: dict[str, Any]) -> None:
        self._begin()
        try:
            start = time.perf_counter()
            with self.client.post(path, json=body, headers=RUN.cfg.headers(), name=name,
                                  catch_response=True) as resp:  # fmt: skip
                if resp.status_code != 200:
                    resp.failure(_http_error(resp))
                    return
                outcome = traffic.measure_body(resp.content or b"", start)
                if outcome.error:
                    resp.failure(outcome.error)
                    return
                resp.success()
            self._report(name, outcome)
        finally:
            self._end()

    def _report(self, name: str, outcome: traffic.Outcome) -> None:
        fire = self.environment.events.request.fire
        if outcome.ttft_ms is not None:
            fire(request_type="TTFT", name=name, response_time=outcome.ttft_ms, response_length=0,
                 exception=None, context={})  # fmt: skip
        if outcome.tpot_ms is not None:
            fire(request_type="TPOT", name=name, response_time=outcome.tpot_ms, response_length=0,
                 exception=None, context={})  # fmt: skip
        fire(request_type="TOKENS/S", name=name, response_time=outcome.tokens_per_second,
             response_length=outcome.tokens, exception=None, context={})  # fmt: skip

    def _begin(self) -> None:
        if not RUN.ready or (RUN.iterations and RUN.started >= RUN.iterations):
            raise StopUser()
        RUN.started += 1

    def _end(self) -> None:
        RUN.finished += 1
        if RUN.iterations and RUN.finished >= RUN.iterations and not RUN.quitting:
            RUN.quitting = True
            runner = self.environment.runner
            if runner is not None:
                gevent.spawn_later(0.1, runner.quit)  # from its own greenlet: quit() kills the users
