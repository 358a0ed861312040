from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from governor.policy.presets import (
    BUILTIN_PRESETS,
    CONTROL_FIELDS,
    LOOP_FIELDS,
    Preset,
    PresetError,
    builtin_presets,
    load_presets,
    parse_presets,
    read_profile,
)
from governor.stream.loop_detector import LoopConfig


def test_builtins() -> None:
    presets = builtin_presets()
    assert set(presets) == {"off", "balanced", "strict"}
    assert presets["off"].fields() == {"loop_detection": False}
    balanced, strict = presets["balanced"], presets["strict"]
    for preset in (balanced, strict):
        assert preset.loop_detection is True
        assert preset.dry_multiplier and preset.dry_multiplier > 0
        assert preset.repetition_penalty is None  # no blunt engine-wide penalty...
        if preset.rep_penalty:  # ...only a windowed one that spares digits and punctuation
            assert preset.rep_window and preset.rep_exempt_digits_punct
    assert strict.ngram_size and strict.rep_penalty and strict.rep_exempt_digits_punct


def test_strict_is_stronger_than_balanced() -> None:
    presets = builtin_presets()
    balanced, strict = presets["balanced"], presets["strict"]
    assert strict.dry_multiplier and balanced.dry_multiplier and strict.dry_multiplier >= balanced.dry_multiplier
    assert strict.rep_penalty and strict.rep_penalty >= (balanced.rep_penalty or 1.0)
    if balanced.ngram_size:  # a shorter n-gram forbids more
        assert strict.ngram_size and strict.ngram_size <= balanced.ngram_size

    def spans(name: str) -> tuple[int, int, int]:
        fields = BUILTIN_PRESETS[name]
        loop = LoopConfig(**{attr: fields[key] for key, attr in LOOP_FIELDS.items() if key in fields})
        return loop.min_sentence_chars, loop.phrase_span_chars, loop.symbol_span_chars

    # an earlier loop cut: no threshold later than balanced's, at least one sooner
    assert all(s <= b for s, b in zip(spans("strict"), spans("balanced"), strict=True))
    assert spans("strict") != spans("balanced")


def test_loop_fields_cover_loop_config() -> None:
    attrs = {f.name for f in dataclasses.fields(LoopConfig)} - {"enabled"}
    assert set(LOOP_FIELDS.values()) == attrs
    assert set(LOOP_FIELDS) <= CONTROL_FIELDS
    assert "loop_detection" in CONTROL_FIELDS
    assert "repetition_penalty" not in CONTROL_FIELDS and "description" not in CONTROL_FIELDS


def test_builtin_loop_settings_make_valid_loop_configs() -> None:
    for name, fields in BUILTIN_PRESETS.items():
        kwargs = {attr: fields[key] for key, attr in LOOP_FIELDS.items() if key in fields}
        LoopConfig(**kwargs)  # raises if inconsistent
        assert name


def test_load_none_is_builtins() -> None:
    assert load_presets(None) == builtin_presets()


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "presets.json"
    path.write_text(json.dumps(data))
    return path


def test_user_file_with_extends(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "chatty": {"extends": "balanced", "dry_multiplier": 0.5, "description": "gentler"},
            "chattier": {"extends": "chatty", "ngram_size": 6},
            "bare": {"ngram_size": 3},
        },
    )
    presets = load_presets(path)
    assert {"off", "balanced", "strict", "chatty", "chattier", "bare"} <= set(presets)
    chatty = presets["chatty"]
    assert chatty.dry_multiplier == 0.5
    assert chatty.dry_allowed_length == BUILTIN_PRESETS["balanced"]["dry_allowed_length"]
    assert chatty.loop_detection is True and chatty.description == "gentler"
    assert presets["chattier"].ngram_size == 6 and presets["chattier"].dry_multiplier == 0.5
    assert presets["bare"].fields() == {"ngram_size": 3}  # no extends: starts from nothing


def test_user_file_may_retune_a_builtin(tmp_path: Path) -> None:
    presets = load_presets(_write(tmp_path, {"balanced": {"extends": "balanced", "dry_multiplier": 0.6}}))
    assert presets["balanced"].dry_multiplier == 0.6
    assert presets["balanced"].dry_breakers == BUILTIN_PRESETS["balanced"]["dry_breakers"]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"x": {"dry_multiplier": -1}}, "dry_multiplier"),
        ({"x": {"dry_multipler": 1}}, "dry_multipler"),
        ({"x": {"ngram_size": "4"}}, "ngram_size"),
        ({"x": {"rep_scope": "prompt"}}, "rep_scope"),
        ({"x": {"rep_penalty": 4}}, "rep_penalty"),
        ({"x": {"dry_breakers": ["a"] * 33}}, "dry_breakers"),
        ({"x": {"repetition_detection": {"max_pattern_size": 4, "min_count": 1}}}, "min_count"),
        ({"x": {"extends": "nope"}}, "unknown preset 'nope'"),
        ({"a": {"extends": "b"}, "b": {"extends": "a"}}, "cycle"),
        ({"bad name!": {}}, "preset name"),
        ({"x": 3}, "JSON object"),
        ([1, 2], "JSON object"),
    ],
)
def test_invalid_files(tmp_path: Path, data: object, needle: str) -> None:
    with pytest.raises(PresetError, match=None) as info:
        load_presets(_write(tmp_path, data))
    assert needle in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match="not found"):
        load_presets(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(PresetError, match="not valid JSON"):
        load_presets(bad)


def test_parse_presets_names_the_preset() -> None:
    with pytest.raises(PresetError, match=r"preset 'mine'.*loop_near_repeat_count"):
        parse_presets({"mine": {"loop_near_repeat_count": 1}})


def test_preset_is_strict_about_types() -> None:
    with pytest.raises(ValueError):
        Preset.model_validate({"loop_detection": "yes"})
    with pytest.raises(ValueError):
        Preset.model_validate({"rep_exempt": [True]})
    assert Preset.model_validate({"dry_multiplier": 1}).dry_multiplier == 1.0  # ints are fine for floats


def test_read_profile(tmp_path: Path) -> None:
    assert read_profile(tmp_path) is None
    (tmp_path / "governor.json").write_text('{"template": "alpaca", "stop": ["END"]}')
    assert read_profile(tmp_path) == {"template": "alpaca", "stop": ["END"]}
    (tmp_path / "governor.json").write_text("[1]")
    with pytest.raises(PresetError, match="JSON object"):
        read_profile(tmp_path)
