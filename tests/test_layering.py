"""Layering, as one table: every module of the package has a layer and imports only its own layer or
lower ones, including imports inside functions (found by parsing, not by importing); the web framework
only at the edge and in the composition root; torch only where tensors are the job.

Layers, bottom up: 0 foundation (settings, errors, what a request names, the model's files); 1 the engine
side (engine processes and clients, the processors vLLM loads); 2 the domain (stream relay and loop cut,
policy, adapters, metrics, the eval's judge); 3 the request path (``serving/``); 4 the edge (HTTP routes,
the web page); 5 the composition root (``runtime/``) and the commands (``cli/``, ``bench/``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import governor

PACKAGE = Path(governor.__file__).parent

# Top-level modules are listed one by one; a subpackage's modules take the longest prefix listed.
LAYERS: dict[str, int] = {
    "governor": 0, "governor.settings": 0, "governor.errors": 0, "governor.redaction": 0,
    "governor.endpoint": 0, "governor.target": 0, "governor.logs": 0, "governor.model": 0,
    "governor.engine": 1, "governor.processors": 1,
    "governor.stream": 2, "governor.policy": 2, "governor.lora": 2, "governor.metrics": 2, "governor.eval": 2,
    "governor.serving": 3,
    "governor.api": 4, "governor.ui": 4,
    "governor.runtime": 5, "governor.cli": 5, "governor.bench": 5, "governor.__main__": 5,
}  # fmt: skip
WEB = {"fastapi", "starlette", "uvicorn"}
WEB_ALLOWED = ("governor.api", "governor.runtime")
TORCH = {"torch", "triton"}
TORCH_ALLOWED = ("governor.processors", "governor.lora.merge", "governor.bench", "governor.cli.bench",
                 "governor.model.embedded", "governor.engine.vllm_fixes")  # fmt: skip


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix listed; a top-level module must be listed itself."""
    if module in LAYERS:
        return LAYERS[module]
    parts = module.split(".")
    for end in range(len(parts) - 1, 1, -1):  # never falls back to the bare package
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


def imports_of(source: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(governor modules, other top-level packages) imported anywhere in ``source``."""
    ours: set[str] = set()
    others: set[str] = set()

    def add(name: str) -> None:
        if name == "governor" or name.startswith("governor."):
            while name not in known and "." in name:  # `from governor.x import y`: y may be a name, not a module
                name = name.rsplit(".", 1)[0]
            ours.add(name)
        else:
            others.add(name.split(".")[0])

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                add(f"{node.module}.{alias.name}")
    return ours, others


def violations(sources: dict[str, str]) -> list[str]:
    known = set(sources)
    found = []
    for module, source in sorted(sources.items()):
        layer = layer_of(module)
        if layer is None:
            found.append(f"{module}: no layer (add it to LAYERS)")
            continue
        ours, others = imports_of(source, known)
        for target in sorted(ours - {module}):
            target_layer = layer_of(target)
            if target_layer is not None and target_layer > layer:
                found.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
        if others & WEB and not module.startswith(WEB_ALLOWED):
            found.append(f"{module} imports the web framework ({', '.join(sorted(others & WEB))})")
        if others & TORCH and not module.startswith(TORCH_ALLOWED):
            found.append(f"{module} imports torch")
    return found


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {name: path.read_text() for name, path in module_names().items()}


def test_every_module_imports_only_its_layer_or_lower(sources: dict[str, str]) -> None:
    assert len(sources) > 100
    assert violations(sources) == []


@pytest.mark.parametrize(
    ("module", "planted"),
    [
        ("governor.lora.registry", "import governor.serving.service\n"),  # upward, at module level
        ("governor.engine.pool", "def later():\n    from governor.lora.registry import AdapterRegistry\n"),  # lazy
        ("governor.stream.relay", "from governor.api import deps\n"),
        ("governor.policy.builder", "def f():\n    import fastapi\n"),
        ("governor.serving.service", "import torch\n"),
    ],
)
def test_a_planted_upward_or_lazy_import_fails(sources: dict[str, str], module: str, planted: str) -> None:
    assert violations(sources | {module: sources[module] + "\n" + planted})


def test_a_module_without_a_layer_fails(sources: dict[str, str]) -> None:
    assert violations(sources | {"governor.newcomer": ""}) == ["governor.newcomer: no layer (add it to LAYERS)"]
