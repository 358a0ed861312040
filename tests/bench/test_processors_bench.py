"""`governor bench processors`: the engines it starts, and the synthetic mode on a small shape."""

from __future__ import annotations

import torch

from governor.bench import processors_synthetic as synth
from governor.bench.processors import MEMORY_FLAG, bench_command
from governor.engine.flags import PROCESSORS
from governor.settings import Settings


def test_gpu_engines_split_the_memory_share_and_cpu_engines_keep_the_flags() -> None:
    settings = Settings(gpu_memory_utilization=0.8)
    with_them = bench_command(settings, "m", "m", 1234, "gpu", processors=True, engines=2)
    without = bench_command(settings, "m", "m", 1234, "gpu", processors=False, engines=2)
    assert with_them[with_them.index(MEMORY_FLAG) + 1] == "0.400"
    assert without[without.index(MEMORY_FLAG) + 1] == "0.400"
    assert all(p in with_them for p in PROCESSORS) and not any(p in without for p in PROCESSORS)
    cpu = bench_command(settings, "m", "m", 1234, "cpu", processors=True, engines=2)
    assert MEMORY_FLAG not in cpu and "--logits-processors" in cpu


def test_synthetic_step_runs_each_processor_on_a_text_like_batch() -> None:
    xargs = {"gov_dry_multiplier": 1.0, "gov_ngram_size": 3, "gov_rep_penalty": 1.2, "gov_rep_window": 16}
    classes = [synth.load_class(fqcn) for fqcn in synth.NAMES.values()]
    references = [synth.load_class(fqcn, "reference") for fqcn in synth.NAMES.values()]
    assert [c.__name__ for c in classes] == [c.__name__ for c in references]
    assert all(c.__module__.startswith("governor.processors.reference.") for c in references)
    for chosen in (classes, references):
        ms = synth.step_ms(chosen, xargs, synth.Shape(4, 64, 16, 24), torch.device("cpu"), steps=3, warmup=2)
        assert ms > 0
