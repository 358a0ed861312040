"""Streaming load for the GPU run: several sides (URL + extra body fields) measured interleaved.

Every request is a /v1/completions stream of 512 random token ids (seeded, distinct per request, so
the prefix cache does not help), 256 tokens out with ``ignore_eos`` and greedy decoding, so every
request does the same work. Per run: output tokens/s over the run's wall time (tokens from the
stream's usage chunk), TTFT (first text event) and TPOT ((last event - first event) / (tokens - 1))
p50/p99. Sides run in ABBA order per repetition; medians, spreads and each side's ratio to the first
side are printed as JSON lines (also appended to --out).

    python loadtests/gpu/stream_load.py --side direct=http://127.0.0.1:8100 \\
        --side gateway=http://127.0.0.1:8000 --concurrency 64 256 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

PROMPT_TOKENS = 512
OUTPUT_TOKENS = 256
VOCAB_LOW, VOCAB_HIGH = 1000, 40000  # plain-text range of the SmolLM2 vocabulary, no special tokens


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(client: httpx.AsyncClient, side: dict[str, Any], prompt: list[int]) -> dict[str, Any]:
    body = {"model": side["model"], "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **side["extra"]}  # fmt: skip
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", side["url"] + "/v1/completions", json=body, headers=side["headers"]) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": str(event["error"])[:200]}
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens", tokens)
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                last = time.perf_counter()
                first = first or last
    if not first:
        return {"error": "no text"}
    return {"ttft": first - start, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens}


async def run_side(side: dict[str, Any], concurrency: int, requests: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(PROMPT_TOKENS)] for _ in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def gated(p: list[int]) -> dict[str, Any]:
            async with gate:
                try:
                    return await one(client, side, p)
                except httpx.HTTPError as exc:
                    return {"error": repr(exc)[:200]}

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(p) for p in prompts))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] * 1000 for r in ok]
    tpot = [r["tpot"] * 1000 for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {"side": side["name"], "concurrency": concurrency, "requests": requests, "ok": len(ok),
            "errors": len(errors), "first_error": errors[0] if errors else None, "wall_s": round(wall, 2),
            "tokens": tokens, "tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(pct(ttft, 0.5), 1), "ttft_p99_ms": round(pct(ttft, 0.99), 1),
            "tpot_p50_ms": round(pct(tpot, 0.5), 2), "tpot_p99_ms": round(pct(tpot, 0.99), 2)}  # fmt: skip


def parse_side(text: str, model: str, engine_url: str, key: str) -> dict[str, Any]:
    """name=url[;json-of-extra-body-fields]; the engine's key goes only to the engine's own URL."""
    name, _, rest = text.partition("=")
    url, _, extra = rest.partition(";")
    headers = {"Authorization": f"Bearer {key}"} if key and url.rstrip("/") == engine_url.rstrip("/") else {}
    return {"name": name, "url": url.rstrip("/"), "extra": json.loads(extra) if extra else {}, "model": model,
            "headers": headers}  # fmt: skip


def emit(record: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with out.open("a") as f:
            f.write(line + "\n")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", action="append", required=True, help="name=url[;extra-body-json]")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--engine-url", default="", help="The engine's own URL (gets --engine-key)")
    ap.add_argument("--engine-key", default="", help="Bearer key the engine wants")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--waves", type=float, default=2.0, help="requests per run = waves x concurrency")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sides = [parse_side(s, args.model, args.engine_url, args.engine_key) for s in args.side]
    await run_side(sides[0], 8, 16, seed=0)  # warm-up: connections, the engine's first batches
    for conc in args.concurrency:
        requests = int(args.waves * conc)
        rates: dict[str, list[dict[str, Any]]] = {s["name"]: [] for s in sides}
        for rep in range(args.reps):
            order = sides if rep % 2 == 0 else list(reversed(sides))  # ABBA
            for side in order:
                result = await run_side(side, conc, requests, seed=1000 * rep + conc)
                result["rep"] = rep
                rates[side["name"]].append(result)
                emit(result, args.out)
        base = statistics.median(r["tok_s"] for r in rates[sides[0]["name"]])
        for side in sides:
            runs = rates[side["name"]]
            tok = [r["tok_s"] for r in runs]
            ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(runs, rates[sides[0]["name"]], strict=True)]
            emit({"summary": side["name"], "concurrency": conc, "reps": len(runs),
                  "tok_s_median": statistics.median(tok), "tok_s_min": min(tok), "tok_s_max": max(tok),
                  "ratio_to_" + sides[0]["name"]: round(statistics.median(tok) / base, 4),
                  "paired_ratio_min": round(min(ratios), 4), "paired_ratio_max": round(max(ratios), 4),
                  "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in runs),
                  "ttft_p99_ms": statistics.median(r["ttft_p99_ms"] for r in runs),
                  "tpot_p50_ms": statistics.median(r["tpot_p50_ms"] for r in runs),
                  "tpot_p99_ms": statistics.median(r["tpot_p99_ms"] for r in runs),
                  "errors": sum(r["errors"] for r in runs)}, args.out)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
