"""`governor bench load` against the real engine: a short locust run on the embedded model, no failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from governor.bench import locust_run
from governor.bench.locust_run import LoadOptions
from tests.conftest import Live

pytestmark = pytest.mark.engine


def test_locust_smoke_on_real_engine(live: Live, tmp_path: Path) -> None:
    out = tmp_path / "load"
    lines: list[str] = []
    opts = LoadOptions(host=live.url, users=3, run_time="30s", max_tokens=16, mixes=["base"], model=live.model,
                       results=out, stop_timeout=10)  # fmt: skip
    code = locust_run.run_load(opts, lines.append)
    print("\n".join(lines))
    assert code == 0, "\n".join(lines)
    assert (out / "report.html").is_file() and (out / "locust_stats.csv").is_file()
    rows = locust_run.parse_stats_csv(out / "locust_stats.csv")
    summary = locust_run.summarize(rows)
    assert summary.requests > 0 and summary.failures == 0 and summary.error_rate == 0
    assert summary.tokens_per_s > 0
    types = {row.type for row in rows if row.name == "base chat stream"}
    assert {"POST", "TTFT", "TPOT", "TOKENS/S"} <= types
