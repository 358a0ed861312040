"""`governor bench processors --synthetic --churn`: processor steps timed as a load sees them.

Under load, requests finish and new ones take their rows: with B rows decoding outputs of L tokens,
about B / L requests are replaced per step (4 per step at 1,024 rows and 256 tokens, so there every
step changes the batch). ``ChurnBatch`` replays that the way vLLM's persistent batch
(``gpu_input_batch.InputBatch``) reports it to logits processors, through vLLM's own
``BatchUpdateBuilder``: a finished request is removed, a newcomer takes the lowest free row (or is
appended), and ``condense`` moves the last rows down into holes still free (one-way moves). A
replacement arrives ``lag`` steps after the request it replaces finished (a closed-loop client's
round trip; 0: same step, no moves), so the rate is B / (L + lag). Rows start at staggered output
lengths, so replacements are spread evenly from the first step. A newcomer's first step is its
prefill (empty output list). vLLM's batch reordering for attention backends that put prefills last
(swaps) is not replayed: FlashAttention and the CPU backend do not reorder.

``host_scaling``: host time per step at the largest batch / the smallest, steady and change steps
together (each kind's median weighted by its share of the steps). "Kernels stubbed" is done by
subtraction, on CPU tensors: a torch dispatch mode (``KernelClock``) times every aten op, and host
time is wall time minus the time inside the ops and minus the mode's own cost per op, measured on a
trivial op at the start (``clock_overhead``). What stays is what a GPU host pays too: Python, numpy,
list passes, torch's Python binding per op. The ``meta`` device was tried first and rejected: its ops
run torch's Python meta registrations, ~50-100 µs each (a ``balanced`` step at 8 rows: 1.5 ms on
meta against 0.23 ms on CPU kernels included), a constant that would hide how the rest grows with
the batch; a dispatch mode alone adds ~5-30 µs per op, hence the subtraction. The Governor processor
is timed there without its CPU-only choices (``SharedHistory``: DRY's matched cells found on the
host), which a GPU host does not run.

The second line compares the Governor processor (``PROCESSORS``) with the three separate ones
(``SEPARATE_PROCESSORS``) on real CPU kernels at the largest batch and the model's vocabulary:
steady steps (``processors_synthetic.step_ms``) and churn steps, median of interleaved reps.
"""

from __future__ import annotations

import functools
import gc
import json
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, BatchUpdateBuilder, MoveDirectionality

from governor.bench.processors_synthetic import (
    Shape,
    TextLike,
    fake_vllm_config,
    load_class,
    model_vocab,
    set_xargs,
    step_ms,
)
from governor.engine.flags import PROCESSORS, SEPARATE_PROCESSORS
from governor.processors.shared_history import SharedHistory

SETS = {"governor": PROCESSORS, "separate": SEPARATE_PROCESSORS}


@dataclass(slots=True)
class Live:
    """A request in the batch: vLLM's live output list, grown from an output drawn up front."""

    prompt: list[int]
    text: list[int]
    output: list[int]


@functools.lru_cache(maxsize=2)
def texts(vocab: int, prompt: int, length: int, seed: int) -> dict[int, tuple[list[int], list[int]]]:
    """Request number -> (prompt, whole output), filled as requests are drawn; shared by every
    processor set timed on the shape, so each sees the same text."""
    return {}


def request_text(vocab: int, prompt: int, length: int, seed: int, number: int) -> tuple[list[int], list[int]]:
    """Prompt and whole output of request ``number`` (its own random stream, independent of order)."""
    drawn = texts(vocab, prompt, length, seed)
    if number not in drawn:
        history = TextLike(vocab, seed * 1_000_003 + number).extend([], prompt + length)
        drawn[number] = (history[:prompt], history[prompt:])
    return drawn[number]


class ChurnBatch:
    """vLLM's persistent batch as logits processors see it, with requests of ``shape.output`` output
    tokens replaced as they finish."""

    def __init__(self, shape: Shape, lag: int, params: SamplingParams, seed: int) -> None:
        self.shape, self.length, self.lag, self.params, self.seed = shape, shape.output, lag, params, seed
        self.rows: list[Live | None] = []
        self.arrivals: list[int] = []  # step at which each queued replacement arrives
        self.drawn = 0
        self.now = 0
        self.builder = BatchUpdateBuilder()
        self.moves = 0

    def _new(self, done: int) -> Live:
        prompt, text = request_text(self.shape.vocab, self.shape.prompt, self.length, self.seed, self.drawn)
        self.drawn += 1
        return Live(prompt, text, text[:done])

    def start(self) -> BatchUpdate:
        """Every row added, outputs staggered over [0, length) so finishes are spread evenly."""
        batch = self.shape.batch
        for row in range(batch):
            live = self._new(row * self.length // batch)
            self.rows.append(live)
            self.builder.added.append((row, self.params, live.prompt, live.output))
        update = self.builder.get_and_reset(batch)
        assert update is not None
        return update

    def step(self) -> BatchUpdate | None:
        """The next step's update, as ``InputBatch`` builds it: removals, additions, condense."""
        self.now += 1
        builder, rows = self.builder, self.rows
        for row, live in enumerate(rows):
            if live is not None and len(live.output) >= self.length:
                builder.removed_append(row)
                rows[row] = None
                self.arrivals.append(self.now + self.lag)
        due = [at for at in self.arrivals if at <= self.now]
        self.arrivals = [at for at in self.arrivals if at > self.now]
        for _ in due:
            free = builder.pop_removed()
            live = self._new(0)
            if free is None:
                free = self.count
                rows.append(live)
            else:
                rows[free] = live
            builder.added.append((free, self.params, live.prompt, live.output))
        self._condense()
        return builder.get_and_reset(self.count)

    def _condense(self) -> None:
        """Move the last rows down into the lowest holes (``InputBatch.condense``), drop the tail's."""
        builder, rows = self.builder, self.rows
        holes = builder.removed  # descending; the lowest is peeked
        last = len(rows) - 1
        while holes:
            while last >= 0 and rows[last] is None:
                last -= 1
            empty = builder.peek_removed()
            assert empty is not None
            if empty >= last:
                break
            builder.pop_removed()
            rows[empty], rows[last] = rows[last], None
            builder.moved.append((last, empty, MoveDirectionality.UNIDIRECTIONAL))
            self.moves += 1
        while rows and rows[-1] is None:
            rows.pop()

    @property
    def count(self) -> int:
        """Rows in use (vLLM's ``num_reqs``): after ``step`` they are rows 0..count-1."""
        return sum(live is not None for live in self.rows)

    def sample(self) -> None:
        """Every request gains its next token, as vLLM appends the sampled one to its live list."""
        for live in self.rows:
            if live is not None:
                live.output.append(live.text[len(live.output)])


class KernelClock(TorchDispatchMode):
    """Seconds spent inside every aten op run under it (the kernels, which host time leaves out)
    and how many ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - start
        self.ops += 1
        return out


def clock_overhead(loops: int = 2000, tries: int = 5) -> float:
    """Seconds per op the clock itself adds outside its timer (Python dispatch in and out), measured
    on a trivial op: the least time per op under the clock minus inside the op, minus the least time
    per op without the clock (the least of ``tries``: the run a shared CPU disturbed least).
    ``churn_steps`` takes it off every op, leaving the op's own host cost."""
    tensor = torch.zeros(8)
    plain, clocked = [], []
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(loops):
            tensor.add_(1)
        plain.append(time.perf_counter() - start)
        clock = KernelClock()
        with clock:
            start = time.perf_counter()
            for _ in range(loops):
                tensor.add_(1)
            clocked.append(time.perf_counter() - start - clock.seconds)
    return max(0.0, (min(clocked) - min(plain)) / loops)


@dataclass(frozen=True)
class Steps:
    """Per-step seconds of one churn run, split by whether the batch changed."""

    steady: list[float]
    change: list[float]
    moves: int

    @property
    def per_step(self) -> float:
        """Seconds per step: each kind's median weighted by its share of the steps (a preempted step
        on a shared CPU moves a median little, a mean much)."""
        med = statistics.median
        every = len(self.steady) + len(self.change)
        return sum(len(kind) * med(kind) for kind in (self.steady, self.change) if kind) / every

    def summary(self, scale: float) -> dict[str, Any]:
        every = self.steady + self.change
        med = statistics.median
        return {
            "per_step": round(scale * self.per_step, 2), "mean": round(scale * sum(every) / len(every), 2),
            "steady_median": round(scale * med(self.steady), 2) if self.steady else None,
            "change_median": round(scale * med(self.change), 2) if self.change else None,
            "steady_steps": len(self.steady), "change_steps": len(self.change), "moves": self.moves,
        }  # fmt: skip


def churn_steps(classes: Sequence[type], xargs: dict[str, object], shape: Shape, device: torch.device, lag: int,
                steps: int, warmup: int, overhead: float | None, seed: int = 0) -> Steps:  # fmt: skip
    """Time ``steps`` churn steps (update_state + apply of every processor), requests of
    ``shape.output`` tokens. ``overhead`` (CPU only; None: wall time): host time, that is wall time
    minus the time inside aten ops and minus ``overhead`` per op (``clock_overhead``)."""
    config = fake_vllm_config(shape.vocab, shape.prompt + shape.output + 8, max(shape.batch, 8))
    processors = [cls(config, device, device.type == "cuda") for cls in classes]
    if overhead is not None:  # host time as a GPU's host pays it: not the CPU path's search on the host
        for processor in processors:
            if isinstance(history := getattr(processor, "history", None), SharedHistory):
                history.cache_friendly = False
    batch = ChurnBatch(shape, lag, SamplingParams(extra_args=dict(xargs)), seed)
    update: BatchUpdate | None = batch.start()
    base = torch.randn(shape.batch + 1, shape.vocab, generator=torch.Generator().manual_seed(seed)).to(device)
    clock = KernelClock()
    times: dict[bool, list[float]] = {False: [], True: []}  # by "the batch changed"
    moves = 0
    gc.collect()
    gc.disable()  # as timeit does: a collection walking the drawn text would land in some step
    try:
        for index in range(warmup + steps):
            if index == warmup:
                moves = batch.moves
            if index:
                update = batch.step()
            logits = base[: batch.count].clone()
            _sync(device)
            kernels, ops = clock.seconds, clock.ops
            if overhead is not None:
                clock.__enter__()
            start = time.perf_counter()
            for processor in processors:
                processor.update_state(update)
                logits = processor.apply(logits)
            _sync(device)
            took = time.perf_counter() - start
            if overhead is not None:
                clock.__exit__(None, None, None)
                took = max(0.0, took - (clock.seconds - kernels) - (clock.ops - ops) * overhead)
            if index >= warmup:
                times[update is not None].append(took)
            batch.sample()
    finally:
        gc.enable()
    return Steps(times[False], times[True], batch.moves - moves)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_for(batch: int, length: int, changes: int = 8) -> int:
    """Steps timed at ``batch`` rows: enough for about ``changes`` change steps (all of one output
    length at 8 rows), at least 32."""
    return max(32, min(length, -(-changes * length // batch)))


def host_scaling(xargs: dict[str, object], batches: Sequence[int], prompt: int, length: int, lag: int, vocab: int,
                 reps: int) -> Iterator[str | dict[str, Any]]:  # fmt: skip
    """Host µs per step at each batch size with churn, kernels left out, and largest / smallest;
    ``reps`` rounds, each timing every size and set in turn, so drift hits them alike."""
    cpu = torch.device("cpu")
    overhead = clock_overhead()
    runs: dict[str, dict[int, list[Steps]]] = {name: {b: [] for b in batches} for name in SETS}
    for _ in range(reps):
        for batch in batches:
            for name, fqcns in SETS.items():
                classes = [load_class(fqcn) for fqcn in fqcns]
                shape = Shape(batch, vocab, prompt, length)
                steps = steps_for(batch, length)
                runs[name][batch].append(churn_steps(classes, xargs, shape, cpu, lag, steps, 8, overhead))
    small, large = min(batches), max(batches)
    out: dict[str, Any] = {"host_scaling": {}, "host_scaling_spread": {}, "host_us_per_step": {},
                           "clock_overhead_us": round(overhead * 1e6, 2)}  # fmt: skip
    for name, by_batch in runs.items():
        ratios = sorted(a.per_step / b.per_step for a, b in zip(by_batch[large], by_batch[small], strict=True))
        out["host_scaling"][name] = round(statistics.median(ratios), 3)
        out["host_scaling_spread"][name] = [round(ratios[0], 3), round(ratios[-1], 3)]
        for batch, done in by_batch.items():
            typical = sorted(done, key=lambda run: run.per_step)[(len(done) - 1) // 2]
            each = [run.per_step * 1e6 for run in done]
            summary = typical.summary(1e6) | {"per_step_spread": [round(min(each), 2), round(max(each), 2)]}
            out["host_us_per_step"].setdefault(name, {})[str(batch)] = summary
            yield (
                f"{name}: {batch} rows, churn {length} tokens: host {summary['per_step']:.1f} µs/step"
                f" ({min(each):.1f}-{max(each):.1f}); steady {summary['steady_median']} µs x"
                f" {summary['steady_steps']}, change {summary['change_median']} µs x {summary['change_steps']}"
            )
        median = out["host_scaling"][name]
        yield f"{name}: host_scaling {large}/{small} rows {median:.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})"
    yield out


def compare(xargs: dict[str, object], batch: int, prompt: int, output: int, length: int, lag: int, vocab: int,
            device: torch.device, steps: int, reps: int) -> Iterator[str | dict[str, Any]]:  # fmt: skip
    """Wall ms per step of each set at ``batch`` rows and ``vocab``: steady steps (all rows at
    ``prompt`` + ``output``) and churn steps, ``reps`` interleaved rounds."""
    steady: dict[str, list[float]] = {name: [] for name in SETS}
    churn: dict[str, list[float]] = {name: [] for name in SETS}
    for _ in range(reps):
        for name, fqcns in SETS.items():
            classes = [load_class(fqcn) for fqcn in fqcns]
            steady[name].append(step_ms(classes, xargs, Shape(batch, vocab, prompt, output), device, steps, warmup=3))
            run = churn_steps(classes, xargs, Shape(batch, vocab, prompt, length), device, lag, steps, 3, None)
            churn[name].append(run.per_step * 1000)
    out: dict[str, Any] = {"rows": batch, "vocab": vocab, "device": str(device), "steps": steps}
    for label, table in (("steady_step_ms", steady), ("churn_step_ms", churn)):
        out[label] = {name: _spread(times) for name, times in table.items()}
        ratio = out[label]["governor"]["median"] / out[label]["separate"]["median"]
        out[label]["governor_over_separate"] = round(ratio, 3)
        for name in SETS:
            got = out[label][name]
            spread = f"{got['min']:.3f}-{got['max']:.3f}"
            yield f"{name}: {batch} rows, vocab {vocab}, {label} {got['median']:.3f} ({spread})"
        yield f"{label}: governor / separate {ratio:.3f}"
    yield {"compare": out}


def _spread(times: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(times), 3), "min": round(min(times), 3), "max": round(max(times), 3)}


def run(settings: Any, device_name: str, batches: Sequence[int], prompt: int, output: int, length: int, lag: int,
        steps: int, presets: Sequence[str], threads: int, reps: int) -> Iterator[str]:  # fmt: skip
    """Per preset: human lines, one JSON line with host_scaling, one comparing the two sets at the
    largest batch and the model's vocabulary (``output``: the steady rows' output so far)."""
    from governor.runtime.bootstrap import resolve_model

    if threads:
        torch.set_num_threads(threads)  # one thread by default, as processors_synthetic.run explains
    _, _, model_dir = resolve_model(settings)
    vocab = model_vocab(model_dir)
    xargs = set_xargs(settings, model_dir)
    device = torch.device(device_name)
    for preset in presets:
        common = {"preset": preset, "prompt": prompt, "output_length": length, "lag": lag, "reps": reps,
                  "vocab": vocab, "torch_threads": torch.get_num_threads()}  # fmt: skip
        for item in host_scaling(xargs[preset], batches, prompt, length, lag, vocab, reps):
            yield item if isinstance(item, str) else json.dumps(item | common, sort_keys=True)
        for item in compare(xargs[preset], max(batches), prompt, output, length, lag, vocab, device, steps, reps):
            yield item if isinstance(item, str) else json.dumps(item | common, sort_keys=True)
