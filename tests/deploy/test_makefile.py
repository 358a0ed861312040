"""The Makefile's install recipe, run for real with a recording stand-in for pip.

The stand-in is a fake (it records its arguments and fails like an unreachable registry); the
recipe under test is the real Makefile's, so a GPU profile that falls back to the CPU index fails here.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://cpu-index.invalid/simple"


def _fake_pip(tmp: Path) -> tuple[Path, Path]:
    """A venv whose python exists and a pip that logs each call and fails."""
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\nexit 0\n")
    calls = tmp / "calls.log"
    pip = tmp / "fake-pip"
    pip.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 1\n')
    for script in (python, pip):
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return venv, pip


def _install(tmp: Path, profile: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    venv, pip = _fake_pip(tmp)
    done = subprocess.run(
        ["make", "-C", str(REPO), "install", f"PROFILE={profile}", f"VENV={venv}", f"PIP={pip}",
         f"TORCH_CPU_INDEX={CPU_INDEX}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    calls_file = tmp / "calls.log"
    calls = calls_file.read_text().splitlines() if calls_file.exists() else []
    return done, calls


def test_gpu_profile_never_retries_with_the_cpu_index(tmp_path: Path) -> None:
    done, calls = _install(tmp_path, "gpu")
    assert done.returncode != 0
    assert len(calls) == 1, calls
    assert CPU_INDEX not in calls[0]
    assert "'gpu' install failed" in done.stdout
    assert not (tmp_path / "venv" / ".installed-gpu").exists()


def test_cpu_profile_retries_with_the_cpu_index(tmp_path: Path) -> None:
    done, calls = _install(tmp_path, "cpu")
    assert done.returncode != 0  # the fake pip fails both times
    assert len(calls) == 2, calls
    assert CPU_INDEX not in calls[0]
    assert f"--extra-index-url {CPU_INDEX}" in calls[1]
