"""`governor bench merge`: a merged adapter served with LoRA off vs the same adapter through LoRA.

Two engines on this machine, taking turns (interleaved, same prompts, 128 in / 128 out): the base with
`--enable-lora` serving the adapter, and the merged model (`governor adapters merge`) with LoRA off. The
adapter is made here with peft from the served base (random non-zero weights, rank 16 on the attention
projections), so the run needs nothing but the base model.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

from governor.bench.gateway import PROMPT, Pair, _wait_ready, interleaved
from governor.bench.processes import spawned
from governor.engine.flags import detect_device, engine_command, engine_env
from governor.engine.process import free_port
from governor.lora.merge import plan_merge, run_merge
from governor.runtime.bootstrap import resolve_model
from governor.settings import Settings

ADAPTER = "bench-adapter"
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapter(base_dir: Path, dest: Path) -> Path:
    """A rank-16 LoRA of the base with random non-zero weights (peft), saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(dest))
    return dest


def report(pair: Pair) -> str:
    """merged / LoRA throughput (Pair's `direct` is the LoRA side, `gateway` the merged one)."""
    ratios = pair.ratios("tokens_per_second")
    lora = statistics.median(x.tokens_per_second for x in pair.direct)
    merged = statistics.median(x.tokens_per_second for x in pair.gateway)
    errors = sum(x.errors for x in pair.direct + pair.gateway)
    return (
        f"{pair.label}: adapter through LoRA {lora:,.1f} tok/s, merged with LoRA off {merged:,.1f} tok/s; "
        f"merged/LoRA median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
        f"n={len(ratios)}); errors {errors}"
    )


def run(settings: Settings, concurrency: int, reps: int, waves: int) -> Iterator[str]:
    model, name, base_dir = resolve_model(settings)
    if base_dir is None:
        raise SystemExit(f"the base model {model!r} has no local files to merge into")
    device = detect_device(settings.device)
    work = Path(tempfile.mkdtemp(prefix="governor-bench-merge-"))
    adapter = make_adapter(base_dir, work / "adapters" / ADAPTER)
    plan = plan_merge(base_dir, name, str(adapter), work / "merged", adapters_dir=work / "adapters",
                      staging_dir=work / "staging", max_rank=RANK, max_bytes=settings.max_adapter_bytes,
                      force=False)  # fmt: skip
    merged = run_merge(plan, lambda line: None)
    yield f"device {device}; adapter rank {RANK} on {', '.join(TARGETS)}; merged into {merged}; logs in {work}"
    lora_settings = settings.model_copy(update={"lora": True, "max_lora_rank": RANK})
    plain_settings = settings.model_copy(update={"lora": False})
    lora_port, merged_port = free_port(), free_port()
    memory = settings.gpu_memory_utilization / 2  # two engines on one GPU
    lora_cmd = engine_command(lora_settings, model, name, lora_port, device, memory_utilization=memory)
    lora_cmd += ["--lora-modules", f"{ADAPTER}={plan.adapter.staged}"]
    merged_cmd = engine_command(plain_settings, str(merged), ADAPTER, merged_port, device, memory_utilization=memory)
    env = engine_env(settings, device)
    with contextlib.ExitStack() as stack:
        for cmd, port, log in ((lora_cmd, lora_port, "lora.log"), (merged_cmd, merged_port, "merged.log")):
            stack.enter_context(spawned(cmd, env=env, log=work / log))
            # One at a time: on a GPU each checks free memory against its share as it starts.
            asyncio.run(_wait_ready(f"http://127.0.0.1:{port}/health", settings.engine_start_timeout))
        body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 128, "ignore_eos": True, "temperature": 0}
        label = f"concurrency {concurrency}, {waves * concurrency} requests a run"
        pair = asyncio.run(interleaved(f"http://127.0.0.1:{lora_port}", f"http://127.0.0.1:{merged_port}", body,
                                       concurrency, waves * concurrency, reps, label, {}))  # fmt: skip
        yield report(pair)
