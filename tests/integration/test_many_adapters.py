"""Many adapters in use at once on the real engine with default settings (4 batch slots, 32 engine slots):
12 and then 64 adapters, two concurrent requests each, all sent at once. No request is refused, and every
answer is its own adapter's (each adapter answers the same question with its own code word)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Live, wait_for
from tests.integration.phrase_adapters import PHRASE_QUESTION, PHRASE_WORDS, phrase_adapters

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("phrase-adapters")


def listed(live: Live) -> set[str]:
    return {m["id"] for m in httpx.get(live.v1 + "/models", timeout=30).json()["data"]}


@pytest.fixture
def dropped(live: Live, workdir: Path) -> Iterator[list[tuple[str, Path, str]]]:
    """Adapters copied into the watched folder by the test; removed (and gone from /v1/models) after it."""
    made: list[tuple[str, Path, str]] = []
    yield made
    for name, _, _ in made:
        shutil.rmtree(live.adapters_dir / name, ignore_errors=True)
    names = {name for name, _, _ in made}
    wait_for(lambda: not names & listed(live), 120, what="the phrase adapters to be unregistered")


def ask(live: Live, name: str) -> tuple[int, str]:
    body = {"model": name, "messages": [{"role": "user", "content": PHRASE_QUESTION}], "max_tokens": 12,
            "temperature": 0}  # fmt: skip
    r = httpx.post(live.v1 + "/chat/completions", json=body, timeout=600)
    if r.status_code != 200:
        return r.status_code, r.text
    return 200, str(r.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("count", [12, 64])
def test_adapters_two_requests_each_all_at_once_answer_their_own_phrase(
    live: Live, workdir: Path, dropped: list[tuple[str, Path, str]], count: int
) -> None:
    dropped += phrase_adapters(workdir, count)
    for name, folder, _ in dropped:
        shutil.copytree(folder, live.adapters_dir / name)
    names = {name for name, _, _ in dropped}
    wait_for(lambda: names <= listed(live), 120, what=f"{count} adapters to be registered")
    jobs = [(name, word) for name, _, word in dropped] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: (job, ask(live, job[0])), jobs))
    refused = [(job[0], status, text[:200]) for job, (status, text) in answers if status != 200]
    assert not refused, f"{len(refused)} of {len(jobs)} requests not answered: {refused[:5]}"
    for (name, word), (_, text) in answers:
        others = [w for w in PHRASE_WORDS if w != word and w in text.lower()]
        assert word in text.lower() and not others, (name, word, text)
