"""`governor adapters merge` refusals (no weights loaded): output exists, quantized base, the same
validation messages as a load. The merge itself and its equivalence to LoRA serving are in
tests/integration/test_merge.py (real engine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from governor.errors import InvalidRequest
from governor.lora.base_model import BaseModelInfo
from governor.lora.merge import MergeError, plan_merge
from governor.lora.staging import AdapterStager
from governor.lora.validate import AdapterValidator
from tests.lora.factory import BASE_DIR, BASE_NAME, AdapterFactory, require_base


def _plan(base_dir: Path, adapters: Path, name: str, out: Path, staging: Path, force: bool = False) -> object:
    return plan_merge(
        base_dir, BASE_NAME, name, out, adapters_dir=adapters, staging_dir=staging, max_rank=512,
        max_bytes=512 * 2**20, force=force,
    )  # fmt: skip


@pytest.fixture
def adapters(tmp_path: Path, factory: AdapterFactory) -> Path:
    root = tmp_path / "adapters"
    root.mkdir()
    factory.copy("good", root / "good")
    return root


def test_an_existing_output_needs_force(tmp_path: Path, adapters: Path) -> None:
    require_base()
    out = tmp_path / "merged"
    out.mkdir()
    with pytest.raises(MergeError, match="--force"):
        _plan(BASE_DIR, adapters, "good", out, tmp_path / "staging")
    plan = _plan(BASE_DIR, adapters, "good", out, tmp_path / "staging", force=True)
    assert plan.adapter.rank == 8  # type: ignore[attr-defined]
    assert plan.params > 100_000_000  # type: ignore[attr-defined]


def test_a_quantized_base_is_refused(tmp_path: Path, adapters: Path) -> None:
    base = tmp_path / "awq-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(MergeError, match=r"quantized \(awq\)"):
        _plan(base, adapters, "good", tmp_path / "merged", tmp_path / "staging")


def test_an_adapter_path_is_validated_like_a_load(tmp_path: Path, adapters: Path) -> None:
    require_base()
    bad = adapters / "with-pickle"
    shutil.copytree(adapters / "good", bad)
    (bad / "adapter_model.bin").write_bytes(b"not really a pickle")
    validator = AdapterValidator(adapters, BaseModelInfo.from_dir(BASE_DIR, BASE_NAME), 512, 512 * 2**20,
                                 AdapterStager(tmp_path / "loader-staging"))  # fmt: skip
    with pytest.raises(InvalidRequest) as as_load:
        validator.validate("with-pickle", "with-pickle")
    with pytest.raises(InvalidRequest) as as_merge:
        _plan(BASE_DIR, adapters, "with-pickle", tmp_path / "merged", tmp_path / "staging")
    assert as_merge.value.message == as_load.value.message
    assert "pickle" in as_merge.value.message
    # A folder given by path is validated the same way, under its parent.
    with pytest.raises(InvalidRequest) as by_path:
        _plan(BASE_DIR, tmp_path / "elsewhere", str(bad), tmp_path / "merged", tmp_path / "staging")
    assert by_path.value.message == as_load.value.message
    assert not (tmp_path / "merged").exists()
