"""`governor bench processors --synthetic`: per-step cost of the anti-loop processors, no engine.

The processors are driven the way vLLM's GPU/CPU model runner drives them: one BatchUpdate adding
every row, then per step each row's live output list grows by one token, ``update_state(None)``
and ``apply(logits)``. Time per step is the median over the measured steps, device work included
(CUDA is synchronised around each step). ``python_scaling`` = step(1024 rows) / step(8 rows) with a
tiny vocabulary and short sequences, where the tensor work is negligible: per-row Python would
make it grow with the batch (~128x), a fixed number of tensor ops keeps it near 1 where the
device runs them in constant time (a GPU at these sizes); on a CPU each op is still elementwise
over [rows x context], so the ratio there also measures the tensor work. It is the median of
``scaling_reps`` interleaved (8, 1024) pairs, with their spread.
"""

from __future__ import annotations

import functools
import importlib
import json
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from governor.engine.flags import SEPARATE_PROCESSORS

# name -> "module:Class" as the engine flags load them; the sets are measured with all three loaded,
# as in the engine, so a processor nobody in the batch uses still costs its early return.
NAMES = {"dry": SEPARATE_PROCESSORS[0], "ngram": SEPARATE_PROCESSORS[1], "window_penalty": SEPARATE_PROCESSORS[2]}
SETS = ("balanced", "strict")
BATCHES = (8, 64, 256, 1024)
TINY_VOCAB = 256


@dataclass(frozen=True)
class Shape:
    """One measured configuration."""

    batch: int
    vocab: int
    prompt: int
    output: int


def load_class(fqcn: str, implementation: str = "") -> type:
    """The processor class; ``implementation="reference"`` picks the slow per-row original."""
    module, _, name = fqcn.partition(":")
    if implementation:
        module = module.replace("governor.processors.", f"governor.processors.{implementation}.")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def fake_vllm_config(vocab: int, max_len: int, max_rows: int) -> Any:
    """The parts of VllmConfig the processors read."""
    model = SimpleNamespace(get_vocab_size=lambda: vocab, max_model_len=max_len)
    return SimpleNamespace(model_config=model, scheduler_config=SimpleNamespace(max_num_seqs=max_rows))


class TextLike:
    """Token streams with a Zipf-like unigram law and copied spans, so repeats (and DRY matches) occur."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab = vocab
        self.rng = random.Random(seed)

    def token(self, history: list[int]) -> int:
        rng = self.rng
        if len(history) > 8 and rng.random() < 0.3:
            # Continue a copy of an earlier span: text repeats phrases, and loops are long copies.
            start = rng.randrange(len(history) - 1)
            return history[start + 1]
        return min(self.vocab - 1, int(self.vocab ** rng.random()) - 1)

    def extend(self, history: list[int], count: int) -> list[int]:
        for _ in range(count):
            history.append(self.token(history))
        return history


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=2)
def streams(shape: Shape, steps: int, seed: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompts, outputs so far, the next token of every row per step), drawn once per shape: drawing
    a 1,024 x 2k batch in Python takes seconds, and every processor and set is timed on the same text."""
    gen = TextLike(shape.vocab, seed)
    prefill = max(0, shape.output - steps)
    prompts = [gen.extend([], shape.prompt) for _ in range(shape.batch)]
    outputs = [gen.extend(list(p), prefill)[shape.prompt :] for p in prompts]
    histories = [p + o for p, o in zip(prompts, outputs, strict=True)]
    upcoming = []
    for _ in range(steps):
        tokens = [gen.token(h) for h in histories]
        for history, token in zip(histories, tokens, strict=True):
            history.append(token)
        upcoming.append(tokens)
    return prompts, outputs, upcoming


def step_ms(classes: Sequence[type], xargs: dict[str, object], shape: Shape, device: torch.device, steps: int,
            warmup: int, seed: int = 0) -> float:  # fmt: skip
    """Median milliseconds of one decoding step (update_state + apply of every processor)."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    max_len = shape.prompt + shape.output + 8
    config = fake_vllm_config(shape.vocab, max_len, max(shape.batch, 8))
    pin = device.type == "cuda"
    processors = [cls(config, device, pin) for cls in classes]
    prompts, drawn, upcoming = streams(shape, steps + warmup, seed)
    outputs = [list(output) for output in drawn]  # vLLM's live lists: appended to below
    params = SamplingParams(extra_args=dict(xargs))
    added = [(i, params, prompts[i], outputs[i]) for i in range(shape.batch)]
    update = BatchUpdate(batch_size=shape.batch, removed=[], added=added, moved=[])
    for processor in processors:
        processor.update_state(update)
    base = torch.randn(shape.batch, shape.vocab, generator=torch.Generator().manual_seed(seed)).to(device)
    times = []
    for tokens in upcoming:
        for output, token in zip(outputs, tokens, strict=True):
            output.append(token)
        logits = base.clone()
        _sync(device)
        start = time.perf_counter()
        for processor in processors:
            processor.update_state(None)
            logits = processor.apply(logits)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]) * 1000


def set_xargs(settings: Any, model_dir: Any) -> dict[str, dict[str, object]]:
    """Engine arguments of the `balanced` and `strict` presets, as the policy builds them."""
    from governor.runtime.bootstrap import build_policy

    policy = build_policy(settings, model_dir)
    out = {}
    for preset in SETS:
        body = policy.build({"model": "m", "prompt": "x", "decoding_preset": preset}, kind="completions").body
        out[preset] = dict(body["vllm_xargs"])
    return out


def model_vocab(model_dir: Any, default: int = 49152) -> int:
    """The served model's vocabulary size from its config.json (the embedded SmolLM2: 49152)."""
    if model_dir is None:
        return default
    try:
        with open(model_dir / "config.json", encoding="utf-8") as f:
            return int(json.load(f)["vocab_size"])
    except (OSError, KeyError, ValueError):
        return default


def cases(xargs: dict[str, dict[str, object]], implementation: str) -> dict[str, tuple[list[type], dict[str, object]]]:
    """name -> (processor classes loaded, request args): each processor alone (with `strict`'s
    arguments, which turn all three on) and each preset with all three loaded."""
    every = [load_class(fqcn, implementation) for fqcn in NAMES.values()]
    out = {name: ([load_class(fqcn, implementation)], xargs["strict"]) for name, fqcn in NAMES.items()}
    for preset in SETS:
        out[preset] = (every, xargs[preset])
    return out


def run(settings: Any, device_name: str, batches: Sequence[int], prompt: int, output: int, steps: int,
        only: Sequence[str] = (), implementation: str = "", threads: int = 1,
        scaling_only: bool = False, scaling_reps: int = 3) -> Iterator[str]:  # fmt: skip
    """Human lines, then one JSON line with every per-step time and python_scaling
    (``scaling_only``: only the python_scaling shapes, a few seconds)."""
    from governor.runtime.bootstrap import resolve_model

    device = torch.device(device_name)
    if threads:
        # On a shared CPU, OpenMP's spinning workers make multi-threaded small ops erratic (10-100x
        # slower under load); one thread measures the work itself. 0 keeps torch's default.
        torch.set_num_threads(threads)
    _, _, model_dir = resolve_model(settings)
    vocab = model_vocab(model_dir)
    table = cases(set_xargs(settings, model_dir), implementation)
    if only:
        table = {k: v for k, v in table.items() if k in only}
    result: dict[str, Any] = {
        "device": str(device), "implementation": implementation or "current", "prompt": prompt, "output": output,
        "model_vocab": vocab, "steps": steps, "step_ms": {}, "python_scaling": {}, "scaling_step_ms": {},
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    # Shape-major, so each batch's token streams are drawn once for every processor and set.
    for v in () if scaling_only else (vocab, TINY_VOCAB):
        for batch in batches:
            for name, (classes, xargs) in table.items():
                ms = step_ms(classes, xargs, Shape(batch, v, prompt, output), device, steps, warmup=3)
                result["step_ms"].setdefault(name, {}).setdefault(str(v), {})[str(batch)] = round(ms, 4)
                yield f"{name}: vocab {v}, batch {batch}, prompt {prompt}, output {output}: {ms:.3f} ms/step"
    result["python_scaling_spread"] = {}
    for name, (classes, xargs) in table.items():
        pairs = []
        for _ in range(scaling_reps):  # 8 and 1,024 rows in turn, so drift hits both alike
            small, large = (
                step_ms(classes, xargs, Shape(b, TINY_VOCAB, 64, 64), device, 40, warmup=5) for b in (8, 1024)
            )
            pairs.append((large / small, small, large))
        ratio, small, large = sorted(pairs)[len(pairs) // 2]
        result["scaling_step_ms"][name] = {"8": round(small, 4), "1024": round(large, 4)}
        result["python_scaling"][name] = round(ratio, 2)
        result["python_scaling_spread"][name] = [round(min(pairs)[0], 2), round(max(pairs)[0], 2)]
        yield (
            f"{name}: python_scaling {ratio:.2f} (median of {len(pairs)}, {min(pairs)[0]:.2f}-{max(pairs)[0]:.2f};"
            f" vocab {TINY_VOCAB}, 64+64: {small:.3f} -> {large:.3f} ms)"
        )
    yield json.dumps(result, sort_keys=True)
