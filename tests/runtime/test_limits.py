"""The open-file limit at startup: raised to the hard limit (inherited by engines), warned about when even
the hard limit is below what the settings need. Limits are set in a subprocess: this one stays as it is."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap

from governor.runtime.limits import FD_MARGIN, fds_needed
from governor.settings import Settings

# Runs in a fresh interpreter: lowers soft (and maybe hard) first, as a service manager would, then starts
# the way `governor serve` does, and shows what a process it then starts (an engine) inherits.
SCRIPT = textwrap.dedent("""
    import json, logging, resource, subprocess, sys
    soft, hard = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    from governor.runtime.limits import check_open_files
    from governor.settings import Settings
    limit = check_open_files(Settings(**json.loads(sys.argv[3])))
    child = subprocess.run([sys.executable, "-c",
        "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"], capture_output=True, text=True)
    print(json.dumps({"soft": limit.soft, "hard": limit.hard, "before": limit.before, "needed": limit.needed,
                      "child": int(child.stdout)}))
""")


def start(soft: int, hard: int, **settings: object) -> tuple[dict[str, int], str]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(soft), str(hard), json.dumps(settings)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_needed_is_two_per_admitted_request_per_engine_plus_margin() -> None:
    assert fds_needed(Settings(max_running=100, max_queued=50)) == 2 * 150 + FD_MARGIN
    assert fds_needed(Settings(max_running=100, max_queued=50, engines=3)) == 3 * 2 * 150 + FD_MARGIN
    remote = Settings(max_running=10, max_queued=0, engine_url=["http://a:1", "http://b:1"])
    assert fds_needed(remote) == 2 * 2 * 10 + FD_MARGIN


def test_soft_limit_is_raised_to_the_hard_one_and_engines_inherit_it() -> None:
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)  # lowering a hard limit needs no privilege
    small = {"max_running": 8, "max_queued": 8}
    got, err = start(256, hard, **small)
    assert got["before"] == 256
    assert got["soft"] == got["hard"] == hard
    assert got["child"] == hard  # what an engine started afterwards gets
    assert f"open-file limit {hard} (was 256" in err
    assert "below" not in err  # 2 x 16 + margin fit


def test_warns_when_the_hard_limit_is_below_what_the_settings_need() -> None:
    got, err = start(256, 2048, max_running=1024, max_queued=1024)
    assert got["soft"] == 2048 and got["needed"] == 2 * 2048 + FD_MARGIN
    assert "WARNING the open-file limit (2048) is below the ~5120" in err
    assert "ulimit -Hn 5120" in err and "LimitNOFILE=5120" in err
