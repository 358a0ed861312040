"""One config against each other config, answer against answer: same prompt, same temperature, same seed.

Any control that changes a logit changes what the seeded sampler draws from then on, so two configs' sampled
rates are two draws, and on this eval they move by several answers in a hundred from seed to seed. Pairing
answers and resampling prompts (each with all of its seeds, since one prompt's answers are not independent)
gives a 95% interval for the difference: whether a gap is more than that noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from governor.eval.loops import MEASURES, Answer, Run

# Fixed generator and draw count: a report prints the same interval every time (on one NumPy: its streams may
# change between major versions, which could move a printed end by one).
RESAMPLES = 10_000


@dataclass(frozen=True)
class Difference:
    """Counts of one measure for the base config and another, over the answers both have."""

    base: int
    other: int
    answers: int
    low: float  # 95% interval of base - other, in answers
    high: float


@dataclass(frozen=True)
class Comparison:
    """The base config against one other config at one temperature; no seeds: no run of the base to pair with."""

    config: str
    temperature: float
    seeds: list[int]
    differences: dict[str, Difference]
    same_text: int  # answer pairs written token for token alike: where neither config's controls changed a draw
    paired: int


def _by_key(runs: list[Run]) -> dict[tuple[str, float, int], dict[str, Answer]]:
    return {(r.config, r.temperature, r.seed): {a.prompt["id"]: a for a in r.answers if not a.error} for r in runs}


def difference(pairs: list[tuple[str, int, int]], rng: np.random.Generator) -> Difference:
    """(prompt id, base value, other value) per paired answer -> counts and a prompt-clustered bootstrap."""
    per_prompt: dict[str, int] = {}
    for prompt_id, base, other in pairs:
        per_prompt[prompt_id] = per_prompt.get(prompt_id, 0) + base - other
    # In prompt order, not arrival order (set order varies by process): a report prints the same interval each time.
    sums = np.array([per_prompt[k] for k in sorted(per_prompt)], dtype=np.int64)
    if len(sums) == 0:
        return Difference(0, 0, 0, 0.0, 0.0)
    draws = sums[rng.integers(0, len(sums), size=(RESAMPLES, len(sums)))].sum(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return Difference(sum(p[1] for p in pairs), sum(p[2] for p in pairs), len(pairs), float(low), float(high))


def compare(runs: list[Run], base: str) -> list[Comparison]:
    """`base` against every other config at each temperature, over the seeds both ran and prompts both answered."""
    answers = _by_key(runs)
    others = sorted({(c, t) for c, t, _ in answers if c != base}, key=lambda k: (k[1], k[0]))
    out = []
    for config, temperature in others:
        seeds = sorted(s for c, t, s in answers if (c, t) == (config, temperature) and (base, t, s) in answers)
        if not seeds:
            out.append(Comparison(config, temperature, [], {}, 0, 0))
            continue
        couples = [
            (answers[(base, temperature, seed)][i], answers[(config, temperature, seed)][i])
            for seed in seeds
            for i in answers[(base, temperature, seed)].keys() & answers[(config, temperature, seed)].keys()
        ]
        same_text = sum(mine.text == theirs.text for mine, theirs in couples)
        differences = {}
        for name, measure in MEASURES.items():
            pairs = []
            for mine, theirs in couples:
                counted, value = measure(mine)  # the judge is not cheap on a long answer: once per answer
                if counted:
                    pairs.append((mine.prompt["id"], value, measure(theirs)[1]))
            # A fixed generator per measure: an interval depends on its own pairs only, not on what else is reported.
            differences[name] = difference(pairs, np.random.default_rng(0))
        out.append(Comparison(config, temperature, seeds, differences, same_text, len(couples)))
    return out


def _cell(d: Difference | None) -> str:
    if d is None or not d.answers:
        return "-"
    low, high = round(d.low), round(d.high)  # ints: an end just under 0 prints +0, not -0
    return f"{d.base} vs {d.other} of {d.answers}: {d.base - d.other:+d} ({low:+d} to {high:+d})"


def table(base: str, comparisons: list[Comparison]) -> str:
    """Markdown: one row per other config and temperature; each cell is base vs other, base - other (95%)."""
    head = (
        f"*`{base}` against each config, answer for answer (base vs other, difference, 95% interval; "
        "fewer loops and more passed checks are better; where few pairs differ, see `same text`, an interval is "
        "narrow by construction):*\n"
        "| config | temp | seeds | same text | loops | factual | intended rep. |\n|---|---:|---|---:|---|---|---|"
    )
    rows = [
        f"| {c.config} | {c.temperature:g} | {_seeds(c.seeds)} | {c.same_text} of {c.paired} | "
        + " | ".join(_cell(c.differences.get(name)) for name in MEASURES)
        + " |"
        for c in comparisons
    ]
    return "\n".join([head, *rows])


def _seeds(seeds: list[int]) -> str:
    if not seeds:
        return "none in common"
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))
