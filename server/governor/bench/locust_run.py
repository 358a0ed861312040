"""`governor bench load`: locust, headless, against the server the user names; a summary and thresholds.

Locust runs as a child process (`python -m locust`, the same interpreter): it monkey-patches the standard
library with gevent, which must not happen inside the CLI. Its CSV and HTML reports go to the results
folder; the summary is read back from `<prefix>_stats.csv`.
"""

from __future__ import annotations

import csv
import ipaddress
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MIXES = ("base", "adapters", "loops", "long")
METRIC_TYPES = ("TTFT", "TPOT", "TOKENS/S")  # rows the locustfile fires next to the HTTP ones
CSV_PREFIX = "locust"
REPORT = "report.html"
LOG = "locust.log"
_TIMESPAN = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")
_MAX_RUN_S = 24 * 3600


class LoadTestError(Exception):
    """A load test that cannot start (bad option, no locustfile, host not allowed)."""


@dataclass
class LoadOptions:
    """Everything `governor bench load` passes on to locust."""

    host: str = "http://127.0.0.1:8000"
    users: int = 4
    spawn_rate: float | None = None  # default: all users in the first second
    run_time: str = "60s"
    iterations: int = 0
    mixes: list[str] = field(default_factory=lambda: ["base"])
    model: str = ""
    max_tokens: int = 64
    preset: str = "balanced"
    adapters: str = ""
    governor: bool = True
    api_key: str = ""
    stop_timeout: int = 5
    results: Path | None = None
    locustfile: Path | None = None
    allow_remote: bool = False
    max_error_rate: float = 0.0
    max_ttft_p95_ms: float | None = None


def parse_timespan(text: str) -> int:
    """Locust's run-time syntax (`90`, `90s`, `5m`, `1h30m`) in seconds; at least 1 s, at most a day."""
    match = _TIMESPAN.match(text.strip())
    if not text.strip() or not match:
        raise LoadTestError(f"bad run time {text!r} (examples: 30s, 5m, 1h30m)")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if not 1 <= total <= _MAX_RUN_S:
        raise LoadTestError(f"run time {text!r} must be between 1 s and 24 h")
    return total


def parse_mixes(values: list[str]) -> list[str]:
    """`["base,loops", "long"]` → `["base", "loops", "long"]`, each one known."""
    mixes = [m for v in values for m in v.replace(",", " ").split()]
    unknown = sorted(set(mixes) - set(MIXES))
    if unknown or not mixes:
        raise LoadTestError(f"unknown mix {', '.join(unknown) or '(none)'}; choose from {', '.join(MIXES)}")
    return list(dict.fromkeys(mixes))


def _is_loopback(hostname: str) -> bool:
    if hostname.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False  # a name: it could resolve anywhere


def check_host(host: str, allow_remote: bool) -> str:
    """The server root, refused when it is not loopback unless the user allowed remote targets."""
    url = urlsplit(host.strip())
    if url.scheme not in ("http", "https") or not url.hostname:
        raise LoadTestError(f"host {host!r} must look like http://HOST:PORT")
    if url.path.rstrip("/") or url.query:
        raise LoadTestError(f"host {host!r}: give the server root, without a path (the users add /v1/...)")
    if not allow_remote and not _is_loopback(url.hostname):
        raise LoadTestError(f"{url.hostname} is not a loopback address; pass --allow-remote to send load there")
    return f"{url.scheme}://{url.netloc}"


def find_locustfile(explicit: Path | None, cwd: Path) -> Path:
    """--locustfile, else loadtests/locustfile.py under the current folder, else in the source checkout."""
    if explicit is not None:
        if not explicit.is_file():
            raise LoadTestError(f"no locustfile at {explicit}")
        return explicit.resolve()
    repo = Path(__file__).resolve().parents[3]  # server/governor/bench/ → the checkout root
    for candidate in (cwd / "loadtests" / "locustfile.py", repo / "loadtests" / "locustfile.py"):
        if candidate.is_file():
            return candidate.resolve()
    raise LoadTestError("loadtests/locustfile.py not found here or next to the package; pass --locustfile")


def build_command(opts: LoadOptions, locustfile: Path, out: Path) -> list[str]:
    rate = opts.spawn_rate or opts.users
    return [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
        "-u", str(opts.users), "-r", f"{rate:g}", "-t", opts.run_time, "--stop-timeout", str(opts.stop_timeout),
        "--host", opts.host, "--csv", str(out / CSV_PREFIX), "--html", str(out / REPORT), "--only-summary",
        "--exit-code-on-error", "0",  # failures are judged by the thresholds below, not by locust
        "--tags", *opts.mixes,
    ]  # fmt: skip


def locust_env(opts: LoadOptions, base: dict[str, str]) -> dict[str, str]:
    """The child's environment: ours plus the load-test settings (the key stays off the command line)."""
    env = {
        **base,
        "GOVERNOR_LT_MAX_TOKENS": str(opts.max_tokens),
        "GOVERNOR_LT_GOVERNOR": "1" if opts.governor else "0",
        "GOVERNOR_LT_PRESET": opts.preset,
        "GOVERNOR_LT_ITERATIONS": str(opts.iterations),
    }
    for name, value in (("MODEL", opts.model), ("ADAPTERS", opts.adapters), ("API_KEY", opts.api_key)):
        if value:
            env[f"GOVERNOR_LT_{name}"] = value
    return env


@dataclass(frozen=True)
class StatsRow:
    """One row of locust's `_stats.csv` (times in ms; for TOKENS/S rows, tokens per second)."""

    type: str
    name: str
    count: int
    failures: int
    average: float
    p50: float | None
    p95: float | None
    average_size: float
    rps: float


def _number(text: str) -> float | None:
    return None if text in ("", "N/A") else float(text)


def parse_stats_csv(path: Path) -> list[StatsRow]:
    """The per-name rows (the Aggregated row mixes HTTP and metric rows, so it is left out)."""
    rows = []
    with path.open(newline="") as handle:
        for rec in csv.DictReader(handle):
            if not rec.get("Type"):
                continue
            rows.append(StatsRow(
                type=rec["Type"], name=rec["Name"], count=int(rec["Request Count"]),
                failures=int(rec["Failure Count"]), average=float(rec["Average Response Time"]),
                p50=_number(rec["50%"]), p95=_number(rec["95%"]), average_size=float(rec["Average Content Size"]),
                rps=float(rec["Requests/s"]),
            ))  # fmt: skip
    return rows


@dataclass
class ClassSummary:
    """One request class (a locust name such as `base chat stream`)."""

    name: str
    requests: int = 0
    failures: int = 0
    rps: float = 0.0
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    tpot_p50: float | None = None
    tpot_p95: float | None = None
    tpot_mean: float | None = None
    tokens_per_s: float = 0.0


@dataclass
class LoadSummary:
    """The whole run: HTTP rows give requests and failures; metric rows give TTFT, TPOT and tokens."""

    classes: list[ClassSummary]

    @property
    def requests(self) -> int:
        return sum(c.requests for c in self.classes)

    @property
    def failures(self) -> int:
        return sum(c.failures for c in self.classes)

    @property
    def rps(self) -> float:
        return sum(c.rps for c in self.classes)

    @property
    def tokens_per_s(self) -> float:
        return sum(c.tokens_per_s for c in self.classes)

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def summarize(rows: list[StatsRow]) -> LoadSummary:
    classes: dict[str, ClassSummary] = {}
    for row in rows:
        cls = classes.setdefault(row.name, ClassSummary(row.name))
        if row.type == "TTFT":
            cls.ttft_p50, cls.ttft_p95 = row.p50, row.p95
        elif row.type == "TPOT":
            cls.tpot_p50, cls.tpot_p95, cls.tpot_mean = row.p50, row.p95, row.average
        elif row.type == "TOKENS/S":
            cls.tokens_per_s = row.average_size * row.rps  # tokens per request x requests per second
        else:  # the HTTP row
            cls.requests += row.count
            cls.failures += row.failures
            cls.rps += row.rps
    return LoadSummary(sorted(classes.values(), key=lambda c: c.name))


def check_thresholds(summary: LoadSummary, max_error_rate: float, max_ttft_p95_ms: float | None) -> list[str]:
    """What the run broke, one line each (empty: it passed)."""
    broken = []
    if not summary.requests:
        broken.append("no request was sent")
    elif summary.error_rate > max_error_rate:
        broken.append(f"error rate {summary.error_rate:.2%} > {max_error_rate:.2%}")
    if max_ttft_p95_ms is not None:
        measured = [c for c in summary.classes if c.ttft_p95 is not None]
        if not measured:
            broken.append("no TTFT was measured (no streaming request succeeded)")
        for cls in measured:
            if cls.ttft_p95 is not None and cls.ttft_p95 > max_ttft_p95_ms:
                broken.append(f"TTFT p95 of {cls.name!r} {cls.ttft_p95:g} ms > {max_ttft_p95_ms:g} ms")
    return broken


def _ms(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(summary: LoadSummary) -> list[str]:
    lines = [
        f"requests {summary.requests} ({summary.rps:.1f} req/s), failures {summary.failures} "
        f"(error rate {summary.error_rate:.2%}), output {summary.tokens_per_s:.1f} tokens/s; TTFT and TPOT in ms",
        f"{'class':<34} {'reqs':>6} {'req/s':>7} {'TTFT p50':>9} {'p95':>6} {'TPOT p50':>9} {'p95':>6} "
        f"{'mean':>7} {'out tok/s':>10}",
    ]
    for c in summary.classes:
        lines.append(
            f"{c.name[:34]:<34} {c.requests:>6} {c.rps:>7.1f} {_ms(c.ttft_p50):>9} {_ms(c.ttft_p95):>6} "
            f"{_ms(c.tpot_p50):>9} {_ms(c.tpot_p95):>6} {_ms(c.tpot_mean, 2):>7} {c.tokens_per_s:>10.1f}"
        )
    return lines


def default_results(cwd: Path) -> Path:
    return cwd / "results" / time.strftime("load-%Y%m%d-%H%M%S")


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def run_load(opts: LoadOptions, echo: Callable[[str], None], cwd: Path | None = None) -> int:
    """Run locust, print the summary; 0 passed, 1 a threshold broken, 2 the run itself failed."""
    cwd = cwd or Path.cwd()
    try:
        opts.host = check_host(opts.host, opts.allow_remote)
        run_s = parse_timespan(opts.run_time)
        opts.mixes = parse_mixes(opts.mixes)
        locustfile = find_locustfile(opts.locustfile, cwd)
    except LoadTestError as exc:
        echo(f"error: {exc}")
        return 2
    out = opts.results or default_results(cwd)
    out.mkdir(parents=True, exist_ok=True)
    cmd = build_command(opts, locustfile, out)
    echo(f"load test: {opts.users} users, {opts.run_time}, mix {','.join(opts.mixes)} -> {opts.host}")
    deadline = run_s + opts.stop_timeout + 120  # start-up, model lookup and reports on top of the run
    with (out / LOG).open("wb") as log:
        try:
            rc = subprocess.run(cmd, env=locust_env(opts, dict(os.environ)), stdout=log, stderr=subprocess.STDOUT,
                                timeout=deadline, check=False).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = -1
    stats = out / f"{CSV_PREFIX}_stats.csv"
    if rc != 0 or not stats.exists():
        reason = f"did not finish within {deadline} s" if rc == -1 else f"exited with {rc}"
        echo(f"error: locust {reason}; its log ({out / LOG}) ends:\n{_tail(out / LOG)}")
        return 2
    summary = summarize(parse_stats_csv(stats))
    for line in format_summary(summary):
        echo(line)
    echo(f"reports: {out / REPORT}, {stats}")
    broken = check_thresholds(summary, opts.max_error_rate, opts.max_ttft_p95_ms)
    for line in broken:
        echo(f"FAILED: {line}")
    return 1 if broken else 0
