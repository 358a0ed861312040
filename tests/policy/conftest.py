"""Shared fixtures: the embedded model's tokenizer (skipped when absent) and small stand-ins."""

from __future__ import annotations

from pathlib import Path

import pytest

from governor.policy.builder import Policy
from governor.policy.presets import builtin_presets
from governor.policy.tokenizer_info import TokenizerInfo

EMBEDDED_DIR = Path.home() / ".cache" / "governor" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    if not (EMBEDDED_DIR / "tokenizer.json").is_file():
        pytest.skip(f"embedded model not prepared at {EMBEDDED_DIR} (run `make serve` once)")
    return EMBEDDED_DIR


@pytest.fixture(scope="session")
def smol(embedded_dir: Path) -> TokenizerInfo:
    return TokenizerInfo.load(embedded_dir)


@pytest.fixture
def policy(smol: TokenizerInfo) -> Policy:
    return Policy(builtin_presets(), "balanced", smol, 4096, 16)


@pytest.fixture
def generic_policy() -> Policy:
    return Policy(builtin_presets(), "balanced", TokenizerInfo.generic(), 4096, 16)
