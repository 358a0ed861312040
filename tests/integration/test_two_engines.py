"""Two engine processes on the embedded model behind one gateway: load spreads across both, and
when one is killed every new request still succeeds on the other."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import Live, start_governor, wait_for

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    # LoRA off: halves the per-engine cost on two shared cores; routing is what is under test.
    with start_governor(tmp_path_factory.mktemp("two"), GOVERNOR_ENGINES="2", GOVERNOR_LORA="false",
                        GOVERNOR_RESTART_BACKOFF_MAX="60") as server:  # fmt: skip
        wait_for(lambda: len(server.engine_pids()) == 2, 10, what="two engine processes")
        wait_for(lambda: httpx.get(server.url + "/ready").json()["engines"] == {"engine-0": "ready",
                 "engine-1": "ready"}, 600, interval=1, what="both engines ready")  # fmt: skip
        yield server


def served_by_engine(live: Live) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(live.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = line.split('engine="', 1)[1].split('"', 1)[0]
            counts[engine] = counts.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def complete(live: Live) -> int:
    body = {"model": live.model, "prompt": "Hello", "max_tokens": 24, "ignore_eos": True, "decoding_preset": "off"}
    return httpx.post(live.v1 + "/completions", json=body, timeout=120).status_code


def test_load_spreads_and_survives_one_engine(two: Live) -> None:
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: complete(two), range(16)))
    assert codes == [200] * 16
    served = served_by_engine(two)
    assert served.get("engine-0", 0) >= 3 and served.get("engine-1", 0) >= 3, served

    os.kill(two.engine_pids()[0], signal.SIGKILL)
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: complete(two), range(12)))
    assert codes == [200] * 12  # the dead engine is out of rotation at once
    assert httpx.get(two.url + "/ready").status_code == 200
