"""Where the served model's files are on this machine: a local folder, the Hugging Face cache, or
the folder a remote engine names as its model's root.

The policy (template stops, DRY breakers, digit/punctuation exemptions) and adapter validation
(shapes) need the model's tokenizer and config. A local engine is started from a folder Governor
knows; in front of a remote engine Governor finds the same files here when it can, and otherwise
says which controls are degraded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

log = logging.getLogger("governor")

ENGINE_QUERY_TIMEOUT = 5.0


def local_model_dir(name: str) -> Path | None:
    """A folder holding `name`'s files: `name` itself when it is a folder, else its snapshot in the
    local Hugging Face cache (never downloaded here: the engine owns fetching)."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or name.startswith(".") or name.count("/") > 1:
        return None  # a path that is not here, not a hub name
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        found = Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as exc:  # not cached, a malformed name, an unreadable cache: all mean "not here"
        log.debug("no cached snapshot of %s: %s", name, exc)
        return None
    return found if found.is_dir() else None


def engine_model_root(url: str, api_key: str = "", timeout: float = ENGINE_QUERY_TIMEOUT) -> str | None:
    """The model root a running vLLM server reports on /v1/models (the path or hub name it loaded)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout)
        reply.raise_for_status()
        models = reply.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        log.info("engine %s did not describe its model (%s)", url, exc)
        return None
    # Adapters are listed with a parent; the base model has none.
    for model in models:
        if isinstance(model, dict) and not model.get("parent"):
            root = model.get("root") or model.get("id")
            return str(root) if root else None
    return None


def remote_model_dir(model: str, engine_urls: list[str], api_key: str = "") -> Path | None:
    """The served model's files for a remote engine: from `model` when given, else from what the
    first engine that answers names as its root."""
    if model:
        found = local_model_dir(model)
        if found is None:
            log.warning("GOVERNOR_MODEL=%s is neither a folder here nor in the Hugging Face cache", model)
        return found
    for url in engine_urls:
        root = engine_model_root(url, api_key)
        if root:
            found = local_model_dir(root)
            if found is not None:
                log.info("using the model files at %s (the root engine %s reports)", found, url)
            return found
    return None
