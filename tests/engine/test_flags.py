"""The engine's command line and environment: no secret on the command line, none of Governor's in the env."""

from __future__ import annotations

from pathlib import Path

import pytest

from governor.engine.flags import engine_command, engine_env
from governor.engine.guard import GUARD_FLAGS
from governor.engine.process import VllmProcess, private_socket_dir
from governor.engine.vllm_fixes import FIXES_ENV
from governor.settings import Settings


def test_unix_socket_instead_of_a_port() -> None:
    cmd = engine_command(Settings(), "/m", "m", 0, "cpu", uds=Path("/tmp/governor-x/engine-0.sock"))
    assert cmd[cmd.index("--uds") + 1] == "/tmp/governor-x/engine-0.sock"
    assert "--host" not in cmd and "--port" not in cmd
    tcp = engine_command(Settings(), "/m", "m", 8123, "cpu")  # benches that compare direct vLLM keep TCP
    assert tcp[tcp.index("--port") + 1] == "8123" and tcp[tcp.index("--host") + 1] == "127.0.0.1"


def test_memory_share_on_gpu() -> None:
    cmd = engine_command(Settings(gpu_memory_utilization=0.9), "/m", "m", 0, "gpu", memory_utilization=0.45)
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.45"
    cmd = engine_command(Settings(gpu_memory_utilization=0.8), "/m", "m", 0, "gpu")
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.8"


def test_governor_secrets_stay_out_of_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOVERNOR_API_KEYS", "user-secret")
    monkeypatch.setenv("GOVERNOR_ADMIN_KEY", "admin-secret")
    monkeypatch.setenv("GOVERNOR_ENGINE_API_KEY", "remote-secret")
    monkeypatch.setenv("VLLM_API_KEY", "inherited")
    monkeypatch.setenv("HF_HOME", "/somewhere")
    env = engine_env(Settings(), "cpu")
    assert not [k for k in env if k.startswith("GOVERNOR_")]
    assert env[FIXES_ENV] == "1"  # Governor's vLLM plugin acts in this engine
    assert "VLLM_API_KEY" not in env and env["HF_HOME"] == "/somewhere"
    assert engine_env(Settings(), "gpu", cuda_visible="1")["CUDA_VISIBLE_DEVICES"] == "1"


def test_engine_key_in_its_environment_only(tmp_path: Path) -> None:
    sock = tmp_path / "e.sock"
    cmd = engine_command(Settings(), "/m", "m", 0, "cpu", uds=sock)
    a = VllmProcess("e0", cmd, {}, "m", tmp_path / "log", 10, 1, socket_path=sock)
    b = VllmProcess("e1", cmd, {}, "m", tmp_path / "log", 10, 1, socket_path=sock)
    key = a.env["VLLM_API_KEY"]
    assert len(key) >= 32 and key != b.env["VLLM_API_KEY"]  # fresh per engine
    assert not any(key in part for part in a.command)
    assert a._auth == {"Authorization": f"Bearer {key}"}


def test_an_engine_given_a_key_gets_the_guard_that_wants_it_everywhere(tmp_path: Path) -> None:
    """VllmProcess adds vLLM's `--middleware` flag for Governor's guard (issue 28) where it sets the key, on
    the socket and on a port alike; engine_command alone leaves it out: the benchmarks start a direct vLLM
    from it with no key. An operator's own --middleware in ENGINE_ARGS stays."""
    settings = Settings(engine_args="--middleware some.Other")
    for uds, port in ((tmp_path / "s", 0), (None, 8123)):
        cmd = engine_command(settings, "/m", "m", port, "cpu", uds=uds)
        assert "governor.engine.guard.EngineKeyGuard" not in cmd
        engine = VllmProcess("e0", list(cmd), {}, "m", tmp_path / "log", 10, 1, socket_path=uds, port=port)
        assert engine.command == [*cmd, *GUARD_FLAGS]
        assert "some.Other" in engine.command


def test_private_socket_dir() -> None:
    path = private_socket_dir()
    try:
        assert path.stat().st_mode & 0o777 == 0o700
        assert len(str(path / "engine-15.sock").encode()) < 108
    finally:
        path.rmdir()
