"""`governor bench load`: the summary parser and thresholds, and a CI-sized locust run through `governor serve`
in front of the zero-latency fake engine (no vLLM)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from governor.bench import locust_run
from governor.bench.locust_run import ClassSummary, LoadOptions, LoadSummary, LoadTestError
from governor.engine.process import free_port
from tests.fuzz_support import ENGINES, fake_backed_governor

HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)
STATS = (
    HEADER
    + """
POST,base chat,10,0,8,9.5,4.9,28.0,385.2,2.0,0.0,8,9,9,10,12,20,28,28,28,28,28
TOKENS/S,base chat,10,0,2100,1810.9,568.3,3189.1,16.0,2.0,0.0,2100,2400,2400,3200,3200,3200,3200,3200,3200,3200,3200
POST,base chat stream,40,2,13,13.2,6.3,30.1,3118.7,8.0,0.4,13,14,16,16,20,25,30,30,30,30,30
TOKENS/S,base chat stream,38,0,1300,1401.7,531.2,2525.7,32.0,7.6,0.0,1300,1700,1800,1900,2200,2400,2500,2500,2500,2500,9
TPOT,base chat stream,38,0,3,3.4,2.1,9.7,0.0,7.6,0.0,3,3,4,4,5,7,9,9,9,9,9
TTFT,base chat stream,38,0,11,11.8,5.7,20.5,0.0,7.6,0.0,11,14,16,16,20,21,21,21,21,21,21
POST,base completion,5,0,13,13.9,8.8,19.9,352.6,1.0,0.0,13,16,19,19,20,20,20,20,20,20,20
,Aggregated,141,2,13,396.1,2.1,3189.1,675.8,28.2,0.4,13,22,740,1000,1400,1900,2400,2500,3189,3189,3189
"""
)


def _summary(tmp_path: Path) -> LoadSummary:
    path = tmp_path / "locust_stats.csv"
    path.write_text(STATS)
    return locust_run.summarize(locust_run.parse_stats_csv(path))


def test_summary_reads_http_and_metric_rows(tmp_path: Path) -> None:
    summary = _summary(tmp_path)
    assert [c.name for c in summary.classes] == ["base chat", "base chat stream", "base completion"]
    assert summary.requests == 55 and summary.failures == 2  # HTTP rows only, not TTFT/TPOT/TOKENS or Aggregated
    assert summary.error_rate == pytest.approx(2 / 55)
    assert summary.rps == pytest.approx(11.0)
    stream = summary.classes[1]
    assert (stream.ttft_p50, stream.ttft_p95, stream.tpot_p50, stream.tpot_p95) == (11, 21, 3, 7)
    assert stream.tpot_mean == pytest.approx(3.4)
    assert stream.tokens_per_s == pytest.approx(32.0 * 7.6)
    assert summary.tokens_per_s == pytest.approx(16.0 * 2.0 + 32.0 * 7.6)
    assert summary.classes[2].ttft_p95 is None and summary.classes[2].tokens_per_s == 0
    lines = locust_run.format_summary(summary)
    assert "failures 2 (error rate 3.64%)" in lines[0]
    assert any(line.startswith("base chat stream") and " 21 " in line for line in lines)


def test_summary_with_no_samples_reads_na(tmp_path: Path) -> None:
    path = tmp_path / "empty_stats.csv"
    path.write_text(HEADER + "\n,Aggregated,0,0,0,0.0,0,0,0,0.0,0.0" + ",N/A" * 11 + "\n")
    summary = locust_run.summarize(locust_run.parse_stats_csv(path))
    assert summary.classes == [] and summary.requests == 0 and summary.error_rate == 0


def test_thresholds(tmp_path: Path) -> None:
    summary = _summary(tmp_path)
    assert locust_run.check_thresholds(summary, 0.05, None) == []
    assert locust_run.check_thresholds(summary, 0.05, 21) == []
    [broken] = locust_run.check_thresholds(summary, 0.0, None)
    assert broken.startswith("error rate 3.64% > 0.00%")
    [broken] = locust_run.check_thresholds(summary, 0.05, 20)
    assert "'base chat stream' 21 ms > 20 ms" in broken
    assert locust_run.check_thresholds(LoadSummary([]), 0.0, None) == ["no request was sent"]
    no_stream = LoadSummary([ClassSummary("base chat", requests=3)])
    assert locust_run.check_thresholds(no_stream, 0.0, 100) == ["no TTFT was measured (no streaming request succeeded)"]


@pytest.mark.parametrize(
    "host", ["http://127.0.0.1:8000", "http://localhost:9", "https://[::1]:8443/", "http://127.0.0.2"]
)
def test_loopback_hosts_pass(host: str) -> None:
    assert locust_run.check_host(host, allow_remote=False) == host.rstrip("/")


@pytest.mark.parametrize("host", ["http://10.0.0.5:8000", "http://example.com", "http://0.0.0.0:8000"])
def test_remote_hosts_need_allow_remote(host: str) -> None:
    with pytest.raises(LoadTestError, match="--allow-remote"):
        locust_run.check_host(host, allow_remote=False)
    assert locust_run.check_host(host, allow_remote=True) == host


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "ftp://127.0.0.1", "http://127.0.0.1:8000/v1"])
def test_malformed_hosts(host: str) -> None:
    with pytest.raises(LoadTestError):
        locust_run.check_host(host, allow_remote=True)


def test_timespans_and_mixes() -> None:
    assert [locust_run.parse_timespan(t) for t in ("90", "90s", "5m", "1h30m", "2m5s")] == [90, 90, 300, 5400, 125]
    for bad in ("", "0s", "5x", "25h", "m"):
        with pytest.raises(LoadTestError):
            locust_run.parse_timespan(bad)
    assert locust_run.parse_mixes(["base,loops", "long", "base"]) == ["base", "loops", "long"]
    with pytest.raises(LoadTestError, match="unknown mix"):
        locust_run.parse_mixes(["base", "chaos"])


def test_command_and_environment(tmp_path: Path) -> None:
    opts = LoadOptions(users=3, run_time="20s", mixes=["base", "loops"], model="m", api_key="secret", governor=False)
    cmd = locust_run.build_command(opts, Path("lf.py"), tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "locust"]
    assert cmd[cmd.index("-u") + 1] == "3" and cmd[cmd.index("-r") + 1] == "3" and cmd[cmd.index("-t") + 1] == "20s"
    assert cmd[-3:] == ["--tags", "base", "loops"] and "--headless" in cmd and "--only-summary" in cmd
    assert "secret" not in " ".join(cmd)  # the key travels in the environment, not in `ps`
    env = locust_run.locust_env(opts, {"PATH": "/bin"})
    assert env["GOVERNOR_LT_API_KEY"] == "secret" and env["GOVERNOR_LT_MODEL"] == "m"
    assert env["GOVERNOR_LT_GOVERNOR"] == "0" and env["PATH"] == "/bin"
    assert "GOVERNOR_LT_ADAPTERS" not in env


def test_finds_the_locustfile(tmp_path: Path) -> None:
    found = locust_run.find_locustfile(None, tmp_path)  # not under tmp_path: next to the package source
    assert found.name == "locustfile.py" and found.parent.name == "loadtests"
    with pytest.raises(LoadTestError):
        locust_run.find_locustfile(tmp_path / "missing.py", tmp_path)


def test_refused_host_starts_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    opts = LoadOptions(host="http://192.0.2.1:8000", results=tmp_path / "out")
    assert locust_run.run_load(opts, lines.append, cwd=tmp_path) == 2
    assert "not a loopback address" in lines[0] and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def fake_gateway() -> Iterator[tuple[str, str]]:
    """(gateway URL, fake engine URL): `governor serve` in front of the fake engine."""
    with fake_backed_governor(GOVERNOR_LORA="false", GOVERNOR_API_KEYS="") as url:
        yield url, ENGINES[url]


def test_smoke_run_through_governor(fake_gateway: tuple[str, str], tmp_path: Path) -> None:
    url, _ = fake_gateway
    lines: list[str] = []
    out = tmp_path / "load"
    opts = LoadOptions(host=url, users=3, run_time="6s", max_tokens=16, mixes=["base"], results=out, stop_timeout=2)
    code = locust_run.run_load(opts, lines.append)
    print("\n".join(lines))
    assert code == 0, "\n".join(lines)
    for name in ("report.html", "locust_stats.csv", "locust_failures.csv", "locust.log"):
        assert (out / name).is_file(), name
    rows = locust_run.parse_stats_csv(out / "locust_stats.csv")
    kinds = {(r.type, r.name) for r in rows}
    for stream in ("base chat stream", "base completion stream"):
        assert {("POST", stream), ("TTFT", stream), ("TPOT", stream), ("TOKENS/S", stream)} <= kinds
    summary = locust_run.summarize(rows)
    assert summary.requests > 0 and summary.failures == 0 and summary.error_rate == 0
    assert summary.tokens_per_s > 0
    # The fake engine streams exactly max_tokens tokens, counted from the usage chunk.
    assert all(r.average_size == 16 for r in rows if r.type == "TOKENS/S")
    assert "<html" in (out / "report.html").read_text()[:2000].lower()


def test_iterations_cap_and_plain_vllm_bodies(fake_gateway: tuple[str, str], tmp_path: Path) -> None:
    """Straight at the fake engine, as at a plain vLLM (no Governor fields), stopping after exactly 24 requests."""
    _, engine_url = fake_gateway
    lines: list[str] = []
    opts = LoadOptions(host=engine_url, users=3, run_time="30s", iterations=24, max_tokens=8, mixes=["base", "loops"],
                       governor=False, results=tmp_path / "load")  # fmt: skip
    assert locust_run.run_load(opts, lines.append) == 0, "\n".join(lines)
    rows = locust_run.parse_stats_csv(tmp_path / "load" / "locust_stats.csv")
    assert sum(r.count for r in rows if r.type == "POST") == 24
    assert "loops chat stream" in {r.name for r in rows}  # no preset label when the server is not Governor


def test_unreachable_server_fails_the_run(tmp_path: Path) -> None:
    lines: list[str] = []
    opts = LoadOptions(host=f"http://127.0.0.1:{free_port()}", run_time="3s", results=tmp_path / "load")
    assert locust_run.run_load(opts, lines.append) == 2
    assert "could not resolve the model" in "\n".join(lines)
