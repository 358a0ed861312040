"""The web page in a real headless Chromium against the session's Governor (real vLLM, embedded model):
status with the engine and an adapter dropped during the test, the playground cutting a loop on exactly one
side, and the eval view drawing a saved report. Each view's screenshot is written (path printed) and checked
not blank; each load is timed (DOMContentLoaded) and checked to ask no host but Governor."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Live
from tests.integration.adapters import random_adapter
from tests.integration.placed import Placed, unique
from tests.ui import answers
from tests.ui.browser import dom_content_loaded_ms, foreign_requests, screenshot, start_browser

pytestmark = pytest.mark.engine

DCL_LIMIT_MS = 1000.0
# Greedy, preset off, SmolLM2 repeats a couplet of this poem from its second line on (loadtests' LOOP_PROMPTS).
LOOP_PROMPT = "Write a poem about the sea."
MAX_TOKENS = "80"  # the cut fires inside it (at ~55 tokens); the uncut side runs to it
STREAM_TIMEOUT = 600.0
NONE = "\u2013"  # what the page shows for a value it has not got


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ui-artifacts")
    print(f"\nweb page screenshots: {folder}")
    return folder


@pytest.fixture
def placed(live: Live) -> Iterator[Placed]:
    made = Placed(live)
    yield made
    made.remove()


def wait(driver: Any, condition: Any, timeout: float, what: str, shown: str = "") -> Any:
    """Waits for `condition`; on a timeout the message carries the browser's log and, where `shown` names an
    element (CSS), the text it showed last."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        last = f"; {shown} showed {text(driver, shown)!r}" if shown else ""
        logs = driver.get_log("browser")
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{last}; browser log: {logs}") from None


def open_view(driver: Any, live: Live, view: str) -> None:
    """Loads the page at `view` in a fresh document, twice, and checks the faster DOMContentLoaded: this machine
    is shared with engines and other tests, and one load may lose the CPU for a while; a slow page is slow twice."""
    timings = []
    for _ in range(2):
        driver.get(live.url + "/health")  # a fresh document each time, the connection to Governor warm
        driver.get(f"{live.url}/ui/#{view}")
        wait(driver, lambda d: d.execute_script("return document.body.dataset.view") == view, 30, f"the {view} view")
        timings.append(dom_content_loaded_ms(driver))
    assert min(timings) < DCL_LIMIT_MS, f"DOMContentLoaded took {timings} ms"


def text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def test_status_lists_the_engine_and_an_adapter_dropped_meanwhile(
    live: Live, browser: Any, artifacts: Path, placed: Placed, tmp_path: Path
) -> None:
    open_view(browser, live, "status")
    # restarts: any count; another test in the session may have killed the engine (it is back, ready, by now)
    wait(browser, lambda d: re.search(r"engine-0 ready local \d+ \S+ v1", text(d, "#st-engines tbody")), 60,
         "the engine to be listed ready", shown="#st-engines tbody")  # fmt: skip
    assert text(browser, "#st-model") == live.model
    browser.execute_script("window.sameDocument = true")  # gone if the page reloads
    name = placed.drop(random_adapter(tmp_path / "made", seed=31), unique("ui"))
    wait(browser, lambda d: f"{name} ready engine no" in text(d, "#st-adapters tbody"), 180,
         f"the dropped adapter {name} to show ready", shown="#st-adapters tbody")  # fmt: skip
    assert browser.execute_script("return window.sameDocument") is True  # refreshed without a reload
    assert text(browser, "#st-gpus tbody")  # a row per GPU, or the line saying NVML has none
    screenshot(browser, artifacts, "status")
    assert foreign_requests(browser, live.url) == []


def _side(driver: Any, side: str, preset: str, extra: str) -> None:
    from selenium.webdriver.common.by import By

    fieldset = driver.find_element(By.ID, f"side-{side}")
    for css, value in ((".preset", preset), (".extra", extra)):
        box = fieldset.find_element(By.CSS_SELECTOR, css)
        box.clear()
        box.send_keys(value)


def _column(driver: Any, side: str) -> dict[str, Any]:
    return dict(driver.execute_script(
        "const c = document.getElementById(arguments[0]); return {state: c.dataset.state, stop: c.dataset.stopReason,"
        " finish: c.dataset.finishReason, text: c.querySelector('.output').textContent,"
        " cuts: c.querySelectorAll('.output mark.cut').length, stats: c.querySelector('.stats').textContent};",
        f"col-{side}",
    ))  # fmt: skip


def test_playground_marks_the_loop_cut_on_the_side_it_fired(live: Live, browser: Any, artifacts: Path) -> None:
    from selenium.webdriver.common.by import By

    open_view(browser, live, "playground")
    wait(browser, lambda d: d.execute_script("return document.body.dataset.modelsLoaded") == "1", 30, "the models")
    prompt = browser.find_element(By.ID, "pg-prompt")
    prompt.clear()
    prompt.send_keys(LOOP_PROMPT)
    for field, value in (("pg-max", MAX_TOKENS), ("pg-temp", "0")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    _side(browser, "a", "off", "{}")
    _side(browser, "b", "off", '{"loop_detection": true}')
    browser.find_element(By.ID, "pg-run").click()
    # Tokens arrive live: text shows on a side while its stream still runs.
    wait(browser, lambda d: any(_column(d, s)["state"] == "running" and _column(d, s)["text"] for s in "ab"),
         STREAM_TIMEOUT, "text to stream in while a request runs")  # fmt: skip
    wait(browser, lambda d: all(_column(d, s)["state"] in ("done", "error") for s in "ab"), STREAM_TIMEOUT,
         "both streams to end")  # fmt: skip
    a, b = _column(browser, "a"), _column(browser, "b")
    screenshot(browser, artifacts, "playground")
    assert a["state"] == b["state"] == "done", (a, b)
    assert b["stop"] == "loop_detected" and b["finish"] == "stop", b  # the loop cut fired on B …
    assert a["stop"] != "loop_detected", a  # … and not on A (off, no cut), which ran on
    for column in (a, b):  # the marker shows exactly where the answer came back cut
        assert column["cuts"] == (1 if column["stop"] == "loop_detected" else 0), column
        assert f"stop_reason: {column['stop'] or NONE}" in column["stats"] and "TTFT:" in column["stats"]
        assert re.search(r"tokens: [1-9]\d*", column["stats"]), column["stats"]
    assert len(a["text"]) > len(b["text"]) - len("✂ loop cut")  # A went on past the cut
    _check_snippets(browser)
    assert foreign_requests(browser, live.url) == []


def _check_snippets(driver: Any) -> None:
    """Copy as curl / openai-python for side B: the body as sent, and Python that compiles."""
    from selenium.webdriver.common.by import By

    column = driver.find_element(By.ID, "col-b")
    column.find_element(By.CSS_SELECTOR, ".copy-curl").click()
    curl = column.find_element(By.CSS_SELECTOR, ".snippet").text
    words = shlex.split(curl.replace("\\\n", " "))
    body = json.loads(words[words.index("-d") + 1])
    assert words[2].endswith("/v1/chat/completions")
    assert body["decoding_preset"] == "off" and body["loop_detection"] is True and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": LOOP_PROMPT}]
    column.find_element(By.CSS_SELECTOR, ".copy-py").click()
    python = column.find_element(By.CSS_SELECTOR, ".snippet").text
    compile(python, "snippet", "exec")
    assert "extra_body={" in python and '"loop_detection": True' in python and '"decoding_preset": "off"' in python


def test_eval_view_draws_a_saved_report(live: Live, browser: Any, artifacts: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    path = answers.write(tmp_path, gzipped=True)
    open_view(browser, live, "eval")
    browser.find_element(By.ID, "ev-file").send_keys(str(path))
    wait(browser, lambda d: d.execute_script("return document.body.dataset.evalLoaded") == "1", 60, "the report")
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#ev-summary tbody tr")]
    assert rows[0].startswith("off t=0 0 50.0% 100.0% 100.0% 2"), rows
    assert rows[1].startswith("balanced t=0 0 0.0% 0.0% 0.0% 0"), rows
    bars = browser.find_elements(By.CSS_SELECTOR, "#ev-chart-loops rect.bar")
    drawn = {(b.get_attribute("data-config"), b.get_attribute("data-x")): b for b in bars}
    heights = {key: float(bar.get_attribute("height")) for key, bar in drawn.items()}
    assert heights[("off t=0", "story")] > 0 and heights[("off t=0", "list")] > heights[("off t=0", "story")]
    assert heights[("balanced t=0", "story")] == 1  # a zero share keeps a 1 px sliver
    assert len(browser.find_elements(By.CSS_SELECTOR, "#ev-chart-checks rect.bar")) == 4
    drawn[("off t=0", "story")].click()
    items = browser.find_elements(By.CSS_SELECTOR, "#ev-list .answer-item")
    assert [i.text for i in items] == ["off t=0 · seed 0 · story-01 · loops", "off t=0 · seed 0 · story-03 · ok"]
    items[0].click()
    shown = browser.execute_script("return document.querySelector('#ev-answer .answer-text').textContent")
    assert shown == answers.LOOP, repr(shown)
    assert "finish length" in text(browser, "#ev-answer .note")
    screenshot(browser, artifacts, "eval")
    assert foreign_requests(browser, live.url) == []
