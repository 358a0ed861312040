"""Layering: the service never imports the HTTP layer, the adapter registry never imports the service."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after(module: str) -> set[str]:
    """governor.* modules in sys.modules after importing `module` in a fresh interpreter."""
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('governor')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("service", ["governor.serving", "governor.scope", "governor.request", "governor.quota"])
def test_service_does_not_import_the_http_layer(service: str) -> None:
    loaded = loaded_after(service)
    assert service in loaded
    assert not {m for m in loaded if m == "governor.api" or m.startswith("governor.api.")}


def test_lora_does_not_import_the_service() -> None:
    loaded = loaded_after("governor.lora.registry")
    service = {"governor.serving", "governor.scope", "governor.request", "governor.app"}
    assert not service & loaded
    assert not {m for m in loaded if m.startswith("governor.api")}
    assert "governor.target" in loaded  # what the registry hands the service lives below both
