"""Builds the engine pool and policy from settings: local vLLM processes or remote URLs."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from governor.engine import compat
from governor.engine.base import EngineClient
from governor.engine.devices import plan_engines
from governor.engine.flags import detect_device, engine_command, engine_env
from governor.engine.pool import EnginePool
from governor.engine.process import VllmProcess, private_socket_dir
from governor.engine.remote import RemoteEngine
from governor.lora.base_model import BaseModelInfo
from governor.lora.registry import AdapterRegistry
from governor.model import embedded
from governor.model.files import local_model_dir, remote_model_dir
from governor.policy.builder import Policy
from governor.policy.presets import PresetError, load_presets
from governor.policy.tokenizer_info import TokenizerInfo
from governor.settings import Settings

log = logging.getLogger("governor")


def resolve_model(settings: Settings) -> tuple[str, str, Path | None]:
    """(model argument for vLLM, served name, local directory of its files if any)."""
    if not settings.model:
        path = embedded.prepare(settings.cache_dir)
        return str(path), settings.served_model_name or embedded.EMBEDDED_NAME, path
    local = Path(settings.model).expanduser()
    if local.exists():
        return str(local.resolve()), settings.served_model_name or local.name, local.resolve()
    # A hub name: vLLM fetches it; its tokenizer is read from the Hugging Face cache when already there.
    return settings.model, settings.served_model_name or settings.model, local_model_dir(settings.model)


def build_pool(settings: Settings) -> tuple[EnginePool, Path | None]:
    if settings.engine_url:
        engines: list[EngineClient] = [
            RemoteEngine(f"remote-{i}", url, settings.served_model_name, api_key=settings.engine_api_key)
            for i, url in enumerate(settings.engine_url)
        ]
        # The same policy as a local engine: the model's files from GOVERNOR_MODEL, or from the root
        # the engine reports, when they are on this machine.
        model_dir = remote_model_dir(settings.model, settings.engine_url, settings.engine_api_key)
        return EnginePool(engines, settings.max_running + settings.max_queued), model_dir
    model, served, local = resolve_model(settings)
    device = detect_device(settings.device)
    log.info("engine profile: %s; model: %s (served as '%s')", device, model, served)
    compat.warn_if_unsupported(log)
    plan = plan_engines(settings.engines, device, settings.engine_args, settings.gpu_memory_utilization)
    # Engines sharing a GPU start one at a time: each checks free memory against its share at start.
    start_locks: dict[int | None, asyncio.Lock] = {
        g.share_group: asyncio.Lock() for g in plan if g.share_group is not None
    }
    # Engines listen on Unix sockets in a directory only this user can enter, unless a port is asked for.
    socket_dir = None if settings.engine_port else private_socket_dir()
    engines = []
    for i, share in enumerate(plan):
        port = settings.engine_port + i if settings.engine_port else 0
        uds = socket_dir / f"engine-{i}.sock" if socket_dir else None
        if share.visible is not None:
            log.info("engine-%d: CUDA_VISIBLE_DEVICES=%s, gpu memory %.3f", i, share.visible, share.memory_utilization)
        engines.append(
            VllmProcess(
                name=f"engine-{i}",
                command=engine_command(settings, model, served, port, device, uds, share.memory_utilization),
                env=engine_env(settings, device, share.visible),
                served_model=served,
                log_path=settings.cache_dir / "logs" / f"engine-{i}.log",
                start_timeout=settings.engine_start_timeout,
                backoff_max=settings.restart_backoff_max,
                socket_path=uds,
                port=port,
                record=settings.resolved_state_dir / "engines" / f"engine-{i}.json",
                start_lock=start_locks.get(share.share_group),
            )
        )
    return EnginePool(engines, settings.max_running + settings.max_queued), local


def build_policy(settings: Settings, model_dir: Path | None) -> Policy:
    info = TokenizerInfo.load(model_dir) if model_dir else TokenizerInfo.generic()
    for control in info.degraded():
        log.warning("degraded without the model's files (set GOVERNOR_MODEL to its folder): %s", control)
    presets = load_presets(settings.presets_file)
    return Policy(
        presets, settings.default_preset, info, settings.max_model_len, settings.max_stop,
        model_profile=model_profile(model_dir), allow_engine_fields=settings.allow_engine_fields,
    )  # fmt: skip


def model_profile(model_dir: Path | None) -> dict[str, Any] | None:
    """The model layer of the decoding policy: a `governor.json` in the model's folder (a merged
    adapter carries its profile there), with the same fields as an adapter's."""
    path = model_dir / "governor.json" if model_dir else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PresetError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PresetError(f"{path}: must be a JSON object")
    log.info("model profile from %s", path)
    return data


def build_registry(settings: Settings, pool: EnginePool, model_dir: Path | None, policy: Policy) -> AdapterRegistry:
    """Built even with LoRA off, so /admin and adapter requests can say why adapters are unavailable; the
    policy compiles (and refuses) an adapter's profile when the adapter loads."""
    base = BaseModelInfo.detect(model_dir, settings.served_model_name or pool.served_model)
    return AdapterRegistry(settings, pool, base, compile_profile=policy.compile_profile)
