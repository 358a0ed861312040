"""The Dockerfiles, read statically (no Docker engine here): build inputs, entrypoint, healthcheck, user."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .repo_facts import DOCKERFILES, REPO, Dockerfile, ops_paths, unknown_settings

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(params=sorted(DOCKERFILES), ids=str)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return Dockerfile.parse(DOCKERFILES[request.param])


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern syntax (Go filepath.Match plus `**`) as a regex on a relative path."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _excluded(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negated
    return excluded


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _dockerignore_regex(line.lstrip("!"))))
    return rules


def _source(path: Path) -> bool:
    """A file of the package (code and package data), not a local build or bytecode artefact."""
    return not any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)


def test_dockerignore_keeps_the_package_and_drops_local_state() -> None:
    rules = _dockerignore()
    for kept in ("pyproject.toml", "README.md", "server/governor/cli/main.py", "server/governor/policy/__init__.py"):
        assert not _excluded(kept, rules), f"{kept} must reach the build context"
    for dropped in (".venv/bin/python", ".git/HEAD", "results/x.json", "server/governor/__pycache__/cli.pyc",
                    "tests/conftest.py", "adapters/README.md"):  # fmt: skip
        assert _excluded(dropped, rules), f"{dropped} should stay out of the build context"


def test_copy_sources_exist_and_reach_the_context(dockerfile: Dockerfile) -> None:
    rules = _dockerignore()
    copies = dockerfile.args("COPY") + dockerfile.args("ADD")
    assert copies
    for args in copies:
        words = [w for w in args.split() if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in args.split()), "no multi-stage copies expected"
        for src in words[:-1]:
            path = REPO / src
            assert path.exists(), f"{dockerfile.path.name}: COPY source {src} is not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and _source(p)]
            assert files, f"{src} is empty"
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                assert not _excluded(rel, rules), f"{rel} is copied but .dockerignore drops it"


def test_entrypoint_is_governor_serve(dockerfile: Dockerfile) -> None:
    entry = dockerfile.exec_form("ENTRYPOINT")
    assert entry == ["governor", "serve"]
    assert PYPROJECT["project"]["scripts"]["governor"] == "governor.cli.main:main"


def _governor_commands(dockerfile: Dockerfile) -> list[list[str]]:
    """Every `governor SUB [SUB]` the Dockerfile runs, and its entrypoint."""
    found = [dockerfile.exec_form("ENTRYPOINT")[1:]]
    for run in dockerfile.args("RUN"):
        for m in re.finditer(r"(?:^|&&|;)\s*governor((?:\s+[a-z][a-z-]*)+)", run):
            found.append(m.group(1).split())
    return found


def test_governor_commands_exist_in_the_cli(dockerfile: Dockerfile) -> None:
    commands = _governor_commands(dockerfile)
    assert ["model", "prepare"] in commands, "the embedded model is prepared at build time"
    for sub in commands:
        done = subprocess.run([sys.executable, "-m", "governor", *sub, "--help"], capture_output=True, timeout=120)
        assert done.returncode == 0, f"governor {' '.join(sub)} --help: {done.stderr.decode()[-500:]}"


def test_healthcheck_probes_a_real_route_on_the_served_port(dockerfile: Dockerfile) -> None:
    (health,) = dockerfile.args("HEALTHCHECK")
    assert "--start-period=" in health, "the engine needs minutes to warm up before /ready"
    cmd = health[health.index("CMD") + 3 :].strip()
    m = re.search(r"http://127\.0\.0\.1:[^/]*(/\w+)", cmd)
    assert m, f"no URL in {cmd}"
    assert m.group(1) == "/ready" and m.group(1) in ops_paths()
    env = dockerfile.env()
    assert f"'GOVERNOR_PORT', '{env['GOVERNOR_PORT']}'" in cmd, "the healthcheck must follow GOVERNOR_PORT"
    assert dockerfile.args("EXPOSE") == [env["GOVERNOR_PORT"]]


def test_image_environment(dockerfile: Dockerfile) -> None:
    env = dockerfile.env()
    assert env["GOVERNOR_HOST"] == "0.0.0.0", "a container must listen beyond loopback"
    assert not unknown_settings(env), f"unknown settings: {unknown_settings(env)}"
    assert env["GOVERNOR_ADAPTERS_DIR"] in " ".join(dockerfile.args("VOLUME")), "adapters dir is a volume"
    # The model is prepared after the cache dir is set, so the runtime finds what the build converted.
    steps = dockerfile.instructions
    prepare = next(i for i, (kw, a) in enumerate(steps) if kw == "RUN" and "model prepare" in a)
    cache_env = next(i for i, (kw, a) in enumerate(steps) if kw == "ENV" and "GOVERNOR_CACHE_DIR" in a)
    assert cache_env < prepare


def test_runs_as_a_non_root_user(dockerfile: Dockerfile) -> None:
    users = dockerfile.args("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    uid = int(user) if user.isdigit() else dockerfile.created_uid(user)
    assert uid, f"user {user!r} is not created with a fixed non-zero --uid"
    # The model is prepared as that user, so the runtime user owns the cache it writes logs and state into.
    last_user = max(i for i, (kw, _) in enumerate(dockerfile.instructions) if kw == "USER")
    prepare = next(i for i, (kw, a) in enumerate(dockerfile.instructions) if kw == "RUN" and "model prepare" in a)
    assert last_user < prepare


def test_gpu_image_is_the_vllm_release_of_the_gpu_profile() -> None:
    gpu = Dockerfile.parse(DOCKERFILES["gpu"])
    image = gpu.arg_defaults()["VLLM_IMAGE"]
    (pin,) = [d for d in PYPROJECT["project"]["optional-dependencies"]["gpu"] if d.startswith("vllm==")]
    assert image == f"vllm/vllm-openai:v{pin.removeprefix('vllm==')}"
    installs = " ".join(gpu.args("RUN"))
    assert "[gpu]" not in installs and "[cpu]" not in installs, "vLLM comes from the base image"


def test_cpu_image_installs_the_cpu_profile_like_the_makefile() -> None:
    cpu = Dockerfile.parse(DOCKERFILES["cpu"])
    (base,) = cpu.args("FROM")
    assert base.startswith("python:3.11-slim")
    installs = " ".join(cpu.args("RUN"))
    assert '".[cpu]"' in installs and "--extra-index-url" in installs
    assert cpu.arg_defaults()["TORCH_CPU_INDEX"] in (REPO / "Makefile").read_text()
    assert "pip uninstall -y torchvision torchaudio torchcodec" in installs
