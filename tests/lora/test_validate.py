"""Adapter validation: every attack or mismatch is refused with the right typed error, and nothing outside
the adapters root is ever opened."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from governor.errors import AdapterNotFound, GovernorError, InvalidRequest, PayloadTooLarge
from governor.lora import validate as validate_mod
from governor.lora.base_model import BaseModelInfo
from governor.lora.staging import AdapterStager
from governor.lora.validate import AdapterValidator, check_name
from governor.lora.watcher import header_parses
from tests.lora.factory import BASE_NAME, AdapterFactory, edit_config


class Evil:
    """Unpickling this would create a marker file: proof that pickles are never loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def outside(tmp_path: Path, factory: AdapterFactory) -> Path:
    """A valid adapter outside the root, with its files' atime set in the past (a read would update it)."""
    folder = factory.copy("good", tmp_path / "outside" / "adapter")
    for file in folder.iterdir():
        st = file.stat()
        os.utime(file, ns=(0, st.st_mtime_ns))
    return folder


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the validator opens (its only two ways to open files)."""
    paths: list[str] = []
    real_safe_open = validate_mod.safe_open

    def spy_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        paths.append(str(path))
        return open(path, *args, **kwargs)

    def spy_safe_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        paths.append(str(path))
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(validate_mod, "open", spy_open, raising=False)
    monkeypatch.setattr(validate_mod, "safe_open", spy_safe_open)
    return paths


def validator(root: Path, base: BaseModelInfo, **kw: Any) -> AdapterValidator:
    """A validator staging its copies next to the root (root/../staged)."""
    stager = AdapterStager(root.parent / "staged", refusal=kw.get("refusal", ""))
    return AdapterValidator(
        root, base, kw.get("max_rank", 16), kw.get("max_bytes", 64 * 1024 * 1024), stager,
        require_base_name=kw.get("require_base_name", False),
    )  # fmt: skip


def refused(v: AdapterValidator, name: str, path: str) -> GovernorError:
    with pytest.raises(GovernorError) as info:
        v.validate(name, path)
    return info.value


def assert_untouched(folder: Path, opened: list[str], root: Path) -> None:
    staged = (root.parent / "staged").resolve()  # Governor's own copies
    assert all(Path(p).resolve().is_relative_to(root.resolve()) or Path(p).resolve().is_relative_to(staged)
               for p in opened), opened  # fmt: skip
    for file in folder.iterdir():
        assert file.stat().st_atime_ns == 0, f"{file} was read"


def test_good_adapter_passes(root: Path, factory: AdapterFactory, base_info: BaseModelInfo, opened: list[str]) -> None:
    factory.copy("good", root / "good")
    checked = validator(root, base_info).validate("good", "good")
    assert checked.rank == 8
    assert checked.folder == (root / "good").resolve()
    assert checked.profile is None
    assert opened  # the spy sees the validator's reads
    # An absolute path inside the root is accepted too.
    assert validator(root, base_info).validate("good", str(root / "good")).folder == checked.folder


@pytest.mark.parametrize(
    "name", ["../x", "a/b", ".hidden", "a..b", "x" * 65, "", "-lead", "sp ace", "a@2", "é"]
)  # fmt: skip
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_name(name)
    assert info.value.param == "name"


def test_name_of_the_base_model_is_refused(root: Path, base_info: BaseModelInfo) -> None:
    err = refused(validator(root, base_info), BASE_NAME, "whatever")
    assert isinstance(err, InvalidRequest) and err.param == "name"


@pytest.mark.parametrize("path", ["../outside/adapter", "sub/../../outside/adapter", "a/../../outside"])
def test_traversal_paths(path: str, root: Path, outside: Path, base_info: BaseModelInfo, opened: list[str]) -> None:
    err = refused(validator(root, base_info), "x", path)
    assert isinstance(err, InvalidRequest) and err.param == "path" and ".." in err.message
    assert_untouched(outside, opened, root)


def test_absolute_path_outside(root: Path, outside: Path, base_info: BaseModelInfo, opened: list[str]) -> None:
    err = refused(validator(root, base_info), "x", str(outside))
    assert isinstance(err, InvalidRequest) and err.param == "path" and "outside the adapters root" in err.message
    assert_untouched(outside, opened, root)


def test_symlinked_folder_escaping(root: Path, outside: Path, base_info: BaseModelInfo, opened: list[str]) -> None:
    (root / "link").symlink_to(outside, target_is_directory=True)
    err = refused(validator(root, base_info), "x", "link")
    assert isinstance(err, InvalidRequest) and err.param == "path" and "symlink" in err.message
    assert_untouched(outside, opened, root)


def test_symlinked_file_escaping(
    root: Path, outside: Path, factory: AdapterFactory, base_info: BaseModelInfo, opened: list[str]
) -> None:
    folder = factory.copy("good", root / "a")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    err = refused(validator(root, base_info), "a", "a")
    assert isinstance(err, InvalidRequest) and err.param == "path"
    assert_untouched(outside, opened, root)
    assert not header_parses(root.resolve(), folder)  # the watcher's check refuses it too, unopened
    assert_untouched(outside, opened, root)


@pytest.mark.parametrize("path", [".", "./"])
def test_root_itself_is_refused(path: str, root: Path, base_info: BaseModelInfo) -> None:
    err = refused(validator(root, base_info), "x", path)
    assert isinstance(err, InvalidRequest) and "root itself" in err.message


def test_missing_folder_is_404(root: Path, base_info: BaseModelInfo) -> None:
    err = refused(validator(root, base_info), "x", "nope")
    assert isinstance(err, AdapterNotFound) and err.status == 404


def test_pickle_weights_refused_never_unpickled(
    root: Path, tmp_path: Path, factory: AdapterFactory, base_info: BaseModelInfo
) -> None:
    folder = factory.copy("good", root / "a")
    marker = tmp_path / "pwned"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Evil(marker)))
    err = refused(validator(root, base_info), "a", "a")
    assert isinstance(err, InvalidRequest) and err.param == "path" and "pickle" in err.message
    assert not marker.exists()


def test_missing_weights(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    folder = factory.copy("good", root / "a")
    (folder / "adapter_model.safetensors").unlink()
    err = refused(validator(root, base_info), "a", "a")
    assert isinstance(err, InvalidRequest) and "adapter_model.safetensors" in err.message


def test_corrupt_safetensors(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    folder = factory.copy("good", root / "a")
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    err = refused(validator(root, base_info), "a", "a")
    assert isinstance(err, InvalidRequest) and "safetensors" in err.message


def test_rank_too_large(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    factory.copy("rank32", root / "big")
    err = refused(validator(root, base_info, max_rank=16), "big", "big")
    assert isinstance(err, InvalidRequest) and err.param == "rank" and "16" in err.message
    # rank_pattern values count too
    folder = factory.copy("good", root / "pattern")
    edit_config(folder, rank_pattern={"q_proj": 64})
    err = refused(validator(root, base_info, max_rank=16), "pattern", "pattern")
    assert err.param == "rank"


def test_wrong_base_by_name(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    folder = factory.copy("good", root / "a")
    edit_config(folder, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    err = refused(validator(root, base_info), "a", "a")
    assert isinstance(err, InvalidRequest) and err.param == "base_model" and "Llama-3.2-1B" in err.message
    # Hub-style names of the same model pass (last component, case-insensitive).
    edit_config(folder, base_model_name_or_path="HuggingFaceTB/smollm2-135m-instruct")
    validator(root, base_info).validate("a", "a")


def test_wrong_base_by_shape(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    factory.copy("tiny", root / "tiny")
    err = refused(validator(root, base_info), "tiny", "tiny")
    assert isinstance(err, InvalidRequest) and err.param == "base_model" and "features" in err.message


def test_layer_beyond_base(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    from safetensors.numpy import load_file, save_file

    folder = factory.copy("good", root / "a")
    weights = folder / "adapter_model.safetensors"
    tensors = {k.replace(".layers.0.", ".layers.40."): v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    err = refused(validator(root, base_info), "a", "a")
    assert err.param == "base_model" and "layer 40" in err.message


def test_unknown_target_module(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    folder = factory.copy("good", root / "a")
    edit_config(folder, target_modules=["q_proj", "gate_projection"])
    err = refused(validator(root, base_info), "a", "a")
    assert isinstance(err, InvalidRequest) and err.param == "target_modules" and "gate_projection" in err.message
    edit_config(folder, target_modules=r".*\.nothing_here")
    assert refused(validator(root, base_info), "a", "a").param == "target_modules"
    edit_config(folder, target_modules=r".*\.(q|v)_proj")  # a PEFT regex that matches passes
    validator(root, base_info).validate("a", "a")


def test_too_large(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    factory.copy("good", root / "a")
    err = refused(validator(root, base_info, max_bytes=1000), "a", "a")
    assert isinstance(err, PayloadTooLarge) and err.status == 413


def test_profile(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    folder = factory.copy("good", root / "a")
    (folder / "governor.json").write_text('{"preset": "strict", "stop": ["###"]}')
    assert validator(root, base_info).validate("a", "a").profile == {"preset": "strict", "stop": ["###"]}
    (folder / "governor.json").write_text("[1, 2]")
    assert refused(validator(root, base_info), "a", "a").param == "profile"
    (folder / "governor.json").write_text('{"x": "' + "y" * 70_000 + '"}')
    assert isinstance(refused(validator(root, base_info), "a", "a"), PayloadTooLarge)


def test_unknown_base_checks_names_only(root: Path, factory: AdapterFactory) -> None:
    factory.copy("tiny", root / "tiny")  # shapes differ, but a remote engine's base has no shapes to compare
    checked = validator(root, BaseModelInfo.unknown(BASE_NAME)).validate("tiny", "tiny")
    assert checked.rank == 8
    err = refused(validator(root, BaseModelInfo.unknown("Qwen2.5-0.5B")), "tiny", "tiny")
    assert err.param == "base_model"


def test_base_model_info(base_info: BaseModelInfo) -> None:
    assert (base_info.hidden_size, base_info.intermediate_size) == (576, 1536)
    assert (base_info.num_hidden_layers, base_info.vocab_size) == (30, 49152)
    assert base_info.modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert base_info.shapes["model.layers.0.self_attn.k_proj"] == (192, 576)
    assert not BaseModelInfo.unknown("x").known


# -- staged copies ----------------------------------------------------------------------------------------


def test_checks_run_on_a_read_only_copy(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    folder = factory.copy("good", root / "a")
    (folder / "governor.json").write_text('{"preset": "strict"}')
    (folder / "notes.txt").write_text("not copied")
    v = validator(root, base_info)
    checked = v.validate("a", "a")
    assert checked.staged.parent == root.parent / "staged" and checked.staged.name == checked.fingerprint
    assert sorted(p.name for p in checked.staged.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "governor.json",
    ]  # fmt: skip
    for file in checked.staged.iterdir():
        assert file.read_bytes() == (folder / file.name).read_bytes() and file.stat().st_mode & 0o222 == 0
    # The same bytes give the same copy, shared; the last release removes it.
    assert v.validate("a", "a").staged == checked.staged
    v.stager.release(checked.fingerprint)
    assert checked.staged.is_dir()
    v.stager.release(checked.fingerprint)
    assert not checked.staged.exists()


def test_symlinked_file_inside_the_root_is_refused(
    root: Path, factory: AdapterFactory, base_info: BaseModelInfo
) -> None:
    """Files are opened without following links, even links that stay inside the root."""
    factory.copy("good", root / "real")
    folder = factory.copy("good", root / "a")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(root / "real" / "adapter_model.safetensors")
    err = refused(validator(root, base_info), "a", "a")
    assert isinstance(err, InvalidRequest) and "symlink" in err.message
    assert not list((root.parent / "staged").iterdir())  # nothing left staged


def test_fifo_weights_are_refused_without_hanging(
    root: Path, factory: AdapterFactory, base_info: BaseModelInfo
) -> None:
    folder = factory.copy("good", root / "a")
    (folder / "adapter_model.safetensors").unlink()
    os.mkfifo(folder / "adapter_model.safetensors")
    err = refused(validator(root, base_info), "a", "a")
    assert "regular file" in err.message


def test_staging_unavailable_says_why(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    factory.copy("good", root / "a")
    err = refused(validator(root, base_info, refusal="set GOVERNOR_STAGING_DIR"), "a", "a")
    assert err.code == "adapter_staging_unavailable" and "GOVERNOR_STAGING_DIR" in err.message


# -- tensors --------------------------------------------------------------------------------------------------


def edit_tensors(folder: Path, change: Any) -> None:
    from safetensors.numpy import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)


A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def test_lora_b_rank_is_checked(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    import numpy as np

    folder = factory.copy("good", root / "a")
    edit_tensors(folder, lambda t: t.__setitem__(B, np.zeros((576, 4), dtype=np.float32)))
    err = refused(validator(root, base_info), "a", "a")
    assert err.param == "rank" and "ranks disagree" in err.message
    edit_tensors(folder, lambda t: t.__setitem__(B, np.zeros((576, 32), dtype=np.float32)))
    err = refused(validator(root, base_info, max_rank=16), "a", "a")
    assert err.param == "rank" and "lora_B" in err.message and "32" in err.message
    edit_tensors(folder, lambda t: t.pop(B))
    assert "no lora_B" in refused(validator(root, base_info), "a", "a").message


def test_tensors_that_are_not_lora_matrices_are_refused(
    root: Path, factory: AdapterFactory, base_info: BaseModelInfo
) -> None:
    import numpy as np

    folder = factory.copy("good", root / "a")
    extra = "base_model.model.lm_head.weight"  # what modules_to_save writes
    edit_tensors(folder, lambda t: t.__setitem__(extra, np.zeros((8, 8), dtype=np.float32)))
    err = refused(validator(root, base_info), "a", "a")
    assert extra in err.message and "not a LoRA matrix" in err.message
    # Shapes are checked without a known base too.
    assert extra in refused(validator(root, BaseModelInfo.unknown(BASE_NAME)), "a", "a").message


def test_missing_base_name_warns_or_is_refused(
    root: Path, factory: AdapterFactory, base_info: BaseModelInfo, caplog: pytest.LogCaptureFixture
) -> None:
    folder = factory.copy("good", root / "a")
    edit_config(folder, base_model_name_or_path=None)
    with caplog.at_level("WARNING", logger="governor.lora"):
        validator(root, base_info).validate("a", "a")
    assert "does not name its base model" in caplog.text
    err = refused(validator(root, base_info, require_base_name=True), "a", "a")
    assert err.param == "base_model" and "base_model_name_or_path" in err.message


# -- target_modules regexes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["(.|.)*Z", "(.|.)*(.|.)*(.|.)*(x|x)*(.|.)*(.|.)*Z"])
def test_catastrophic_regex_is_answered_at_once(
    pattern: str, root: Path, factory: AdapterFactory, base_info: BaseModelInfo
) -> None:
    """Python's re takes minutes on these against ~210 module names (PEFT's merge runs it there): refused by shape,
    at once, before anything matches them."""
    import time

    folder = factory.copy("good", root / "a")
    edit_config(folder, target_modules=pattern)
    started = time.perf_counter()
    err = refused(validator(root, base_info), "a", "a")
    assert time.perf_counter() - started < 10  # generous: Python's re would take minutes
    assert err.param == "target_modules" and "backtrack" in err.message


def test_regex_limits(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    folder = factory.copy("good", root / "a")
    edit_config(folder, target_modules=".*" + "x?" * 200)
    assert "limit is 256" in refused(validator(root, base_info), "a", "a").message
    edit_config(folder, target_modules=r"(q)_proj\1")  # a backreference RE2 cannot run
    err = refused(validator(root, BaseModelInfo.unknown(BASE_NAME)), "a", "a")  # refused without a known base too
    assert err.param == "target_modules" and "RE2" in err.message and "escape" in err.message
    edit_config(folder, target_modules="((a{100}){100}){100}")  # a program past RE2's memory bound
    assert refused(validator(root, base_info), "a", "a").param == "target_modules"
