"""Request bodies and stream measurement for OpenAI-compatible load (used by locustfile.py).

No locust import here: the parsing and timing code is plain Python so tests can load it directly.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

MIXES = ("base", "adapters", "loops", "long")

BASE_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Explain in two sentences why the sky is blue.",
    "Give three tips for writing clear documentation.",
    "Summarise what a load balancer does.",
    "Name four planets and one fact about each.",
    "How do I reverse a list in Python?",
)
# Prompts on which small models tend to repeat themselves (the anti-loop presets' target).
LOOP_PROMPTS = (
    "Write a poem about the sea.",
    "Write a poem about the moon and the stars.",
    "List the numbers from 1 to 100.",
    "Write a story about a cat who finds a key.",
    "Describe the colour blue in as much detail as you can.",
    "Repeat the word hello.",
    "Write a song about the rain.",
)
_SENTENCES = (
    "The service receives requests from many clients and streams tokens back as they are generated.",
    "Operators watch latency, throughput and error rates, and add replicas when the queue grows.",
    "Adapters are loaded at runtime, and each one changes how the model answers a question.",
    "The cache holds recent prefixes so that repeated system prompts cost less to process.",
    "A deadline is attached to every request, and work past it is cancelled on the engine.",
    "Metrics are scraped every fifteen seconds and kept for thirty days in the time series store.",
    "The team reviews the slowest requests each week and looks for patterns in their prompts.",
    "Long documents are split into sections, summarised one by one and then combined.",
    "When the engine restarts, the gateway reloads every adapter that was ready before.",
    "Each release is measured against the previous one on the same hardware and the same load.",
)
_WORDS_PER_TOKEN = 0.75  # English prose on Llama-family tokenizers, roughly


@dataclass
class TrafficConfig:
    """What the users send; read from locust options / GOVERNOR_LT_* environment variables."""

    model: str = ""
    max_tokens: int = 64
    governor: bool = True  # send Governor-only fields (decoding_preset); off for a plain vLLM server
    preset: str = "balanced"
    adapters: list[tuple[str, float]] = field(default_factory=list)
    long_tokens: int = 1500
    api_key: str = ""

    def headers(self) -> dict[str, str]:
        # identity: an SSE stream must arrive event by event, not as compressed blocks
        headers = {"Accept-Encoding": "identity"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    return value.strip().lower() in ("1", "true", "yes", "on")


def parse_weights(spec: str) -> list[tuple[str, float]]:
    """`"a:3,b:1"` → `[("a", 3.0), ("b", 1.0)]`; a bare name weighs 1."""
    out: list[tuple[str, float]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        value = float(weight) if weight.strip() else 1.0
        if not name.strip() or value <= 0:
            raise ValueError(f"bad adapter weight {part!r} (expected NAME or NAME:WEIGHT > 0)")
        out.append((name.strip(), value))
    return out


def split_models(listing: dict[str, Any]) -> tuple[str, list[str]]:
    """From a GET /v1/models body: the first base model id (no `parent`) and the adapter ids."""
    entries = [m for m in listing.get("data") or [] if isinstance(m, dict) and m.get("id")]
    if not entries:
        raise ValueError("GET /v1/models listed no models")
    bases = [m["id"] for m in entries if not m.get("parent")]
    adapters = [m["id"] for m in entries if m.get("parent")]
    return (bases or [entries[0]["id"]])[0], adapters


def long_prompt(rng: random.Random, tokens: int) -> str:
    """Roughly `tokens` tokens of varied prose (shuffled per call, so prefix caching rarely helps)."""
    words_wanted = int(tokens * _WORDS_PER_TOKEN)
    parts: list[str] = []
    words = 0
    while words < words_wanted:
        sentence = rng.choice(_SENTENCES)
        parts.append(sentence)
        words += len(sentence.split())
    return "Summarise the following notes in three sentences.\n\n" + " ".join(parts) + "\n\nSummary:"


def chat_body(cfg: TrafficConfig, model: str, prompt: str, stream: bool, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    return _finish(cfg, body, stream, fields)


def completion_body(cfg: TrafficConfig, model: str, prompt: str, stream: bool, **fields: Any) -> dict[str, Any]:
    return _finish(cfg, {"model": model, "prompt": prompt}, stream, fields)


def _finish(cfg: TrafficConfig, body: dict[str, Any], stream: bool, fields: dict[str, Any]) -> dict[str, Any]:
    body["max_tokens"] = cfg.max_tokens
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    preset = fields.pop("decoding_preset", None)
    if preset and cfg.governor:  # plain vLLM rejects or ignores unknown fields; keep its bodies clean
        body["decoding_preset"] = preset
    body.update(fields)
    return body


@dataclass
class Outcome:
    """One request, measured: token timing from the stream, output tokens from the usage chunk."""

    tokens: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    total_ms: float = 0.0
    nbytes: int = 0
    error: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / (self.total_ms / 1000) if self.total_ms > 0 else 0.0


def _has_output(choices: list[dict[str, Any]]) -> bool:
    for choice in choices:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
    return False


def error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or error)
    return str(error)


def measure_stream(lines: Iterable[bytes], start: float, clock: Callable[[], float] = time.perf_counter) -> Outcome:
    """Consume SSE lines; fail on an error event or a stream that ends without `[DONE]`.

    TTFT is the first event that carries output (vLLM's first chat chunk only carries the role);
    TPOT = (last output event - first output event) / (tokens - 1), tokens from the usage chunk.
    """
    out = Outcome()
    first = last = 0.0
    output_events = 0
    usage_tokens: int | None = None
    done = False
    for raw in lines:
        out.nbytes += len(raw)
        line = raw.strip()
        # After [DONE] or an error the rest is still read: a fully read response keeps its connection.
        if done or out.error or not line.startswith(b"data:"):
            continue  # blank separators, comments, `event:` lines
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            out.error = f"unparsable event: {payload[:80]!r}"
            break
        if not isinstance(event, dict):
            continue
        if event.get("error"):
            out.error = "error event: " + error_text(event["error"])
            continue
        if _has_output(event.get("choices") or []):
            now = clock()
            if not output_events:
                first = now
            last = now
            output_events += 1
        usage = event.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            usage_tokens = int(usage["completion_tokens"])
    out.total_ms = (clock() - start) * 1000
    if out.error is None and not done:
        out.error = "stream ended without [DONE]"
    # Without a usage chunk (a server that ignores stream_options) an output event counts as one token.
    out.tokens = usage_tokens if usage_tokens is not None else output_events
    if output_events:
        out.ttft_ms = (first - start) * 1000
    if output_events >= 2 and out.tokens >= 2:
        out.tpot_ms = (last - first) * 1000 / (out.tokens - 1)
    return out


def measure_body(body: bytes, start: float, clock: Callable[[], float] = time.perf_counter) -> Outcome:
    """A non-streaming reply: output tokens from its usage field."""
    out = Outcome(total_ms=(clock() - start) * 1000, nbytes=len(body))
    try:
        reply = json.loads(body)
    except ValueError:
        out.error = f"unparsable body: {body[:80]!r}"
        return out
    if not isinstance(reply, dict) or reply.get("error"):
        out.error = "error body: " + error_text(reply.get("error") if isinstance(reply, dict) else reply)
        return out
    if not reply.get("choices"):
        out.error = "reply without choices"
        return out
    usage = reply.get("usage") or {}
    out.tokens = int(usage.get("completion_tokens") or 0)
    return out


def iter_lines(readline: Callable[[], bytes]) -> Iterator[bytes]:
    """Lines from a blocking `readline()` that returns b"" at the end of the body."""
    while line := readline():
        yield line
