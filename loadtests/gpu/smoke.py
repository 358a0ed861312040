"""Step 1 of the GPU run: /ready, one chat and one completions request under each preset, /metrics.

Writes one JSON object (to stdout and --out) and exits 1 when any check fails.
    python loadtests/gpu/smoke.py --url http://127.0.0.1:8000 --out smoke.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

PRESETS = ("off", "balanced", "strict")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report: dict[str, object] = {}
    failures = []
    with httpx.Client(base_url=args.url, timeout=120) as c:
        ready = c.get("/ready")
        report["ready"] = ready.status_code
        for preset in PRESETS:
            chat = c.post("/v1/chat/completions", json={
                "model": args.model, "max_tokens": 48, "temperature": 0, "decoding_preset": preset,
                "messages": [{"role": "user", "content": "Name three primary colours."}]})  # fmt: skip
            comp = c.post("/v1/completions", json={
                "model": args.model, "max_tokens": 24, "temperature": 0, "decoding_preset": preset,
                "prompt": "The capital of France is"})  # fmt: skip
            for kind, r in (("chat", chat), ("completions", comp)):
                entry: dict[str, object] = {"status": r.status_code}
                if r.status_code == 200:
                    choice = r.json()["choices"][0]
                    entry["text"] = (choice.get("message") or {}).get("content") or choice.get("text")
                    entry["finish_reason"] = choice.get("finish_reason")
                else:
                    entry["body"] = r.text[:300]
                    failures.append(f"{kind}/{preset}: {r.status_code}")
                report[f"{kind}/{preset}"] = entry
        metrics = c.get("/metrics").text
        gpu = [line for line in metrics.splitlines() if line.startswith("governor_gpu")]
        report["gpu_metric_lines"] = gpu[:40]
        report["vllm_metric_names"] = sorted({line.split("{")[0].split(" ")[0] for line in metrics.splitlines()
                                              if line.startswith("vllm:")})[:60]  # fmt: skip
        if not gpu:
            failures.append("no governor_gpu* lines in /metrics")
    if report["ready"] != 200:
        failures.append(f"/ready {report['ready']}")
    report["failures"] = failures
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
