"""Finding the served model's files: a folder, or a snapshot in the Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest

from governor.model.files import local_model_dir


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Point huggingface_hub at `path` (it reads HF_HUB_CACHE once, at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))


def _cached_snapshot(hub_cache: Path, repo: str) -> Path:
    """The layout huggingface_hub writes for a downloaded model (refs/main → snapshots/<commit>)."""
    root = hub_cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snapshot


def test_a_folder_is_itself(tmp_path: Path) -> None:
    assert local_model_dir(str(tmp_path)) == tmp_path.resolve()


def test_a_hub_name_resolves_to_its_cached_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_hub_cache(monkeypatch, tmp_path / "hub")
    snapshot = _cached_snapshot(tmp_path / "hub", "some-org/some-model")
    assert local_model_dir("some-org/some-model") == snapshot


@pytest.mark.parametrize("name", ["some-org/not-cached", "/no/such/folder", "./relative/missing", ""])
def test_names_not_here_give_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    use_hub_cache(monkeypatch, tmp_path / "hub")
    assert local_model_dir(name) is None
