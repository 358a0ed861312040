"""Decoding presets: named bundles of anti-loop controls, built in or read from a JSON file.

A preset sets only the controls it cares about; an unset field means "off" (or the processor's
default for a parameter of an enabled control). Layers (server default → model → adapter profile
→ request) are merged field by field in :mod:`governor.policy.builder`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "BUILTIN_PRESETS",
    "CONTROL_FIELDS",
    "LOOP_FIELDS",
    "PASSTHROUGH_FIELDS",
    "Preset",
    "PresetError",
    "RepetitionDetection",
    "builtin_presets",
    "describe_error",
    "load_presets",
    "parse_presets",
    "read_profile",
]

# The built-in presets: the numbers the lead tunes with `governor eval`, all in this one table.
# Windows beyond the engine's max_model_len are read as "everything" (0).
BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "off": {
        "description": "No anti-loop controls and no loop detection; template stops still apply.",
        "loop_detection": False,
    },
    # Tuned with `governor eval loops` on the embedded SmolLM2 (docs/decoding.md): DRY alone
    # (multiplier 0.8, allowed length 3) still let 4.6% of answers loop through near-repeats ("a winter's
    # night, a winter's night's song, ..."); a light windowed penalty that spares digits and punctuation
    # removed them. A no-repeat 4-gram ban did too, but broke counting ("11. 11" shares a 4-gram with
    # "1. 1" in digit tokens): it stays in `strict` only.
    "balanced": {
        "description": "Default: DRY over the output, a light windowed penalty that spares digits/punctuation, "
        "and gateway loop detection.",
        "dry_multiplier": 1.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_range": 2048,
        "dry_breakers": ["\n", ":", '"', "*"],
        # DRY over the output only: copying from the prompt (a chorus the user quotes, code being edited,
        # "repeat after me") is no loop. On the whole CPU eval (loadtests/RESULTS.md) it gave greedy
        # 1.1% loops and 19.2% intended repetition against 1.6% and 15.4% with the prompt in DRY's context,
        # factual equal; sampled, the tune part was identical. A chat that must not echo its own earlier
        # turns can ask for `dry_scope: "all"`.
        "dry_scope": "output",
        "rep_penalty": 1.1,
        "rep_window": 64,
        "rep_scope": "output",
        "rep_exempt_digits_punct": True,
        "loop_detection": True,
        # A cut non-streaming answer is trimmed to the first copy, so a cut on "repeat this phrase four
        # times" turns a right answer wrong: sentences under 40 chars count as phrases (a run of 128
        # chars, ~5 copies, before the cut) and a sentence must recur 4 times. Loops run to max_tokens,
        # so cutting them a copy or two later costs a few tokens (tests/eval/test_cut_spares_answers.py).
        "loop_min_sentence_chars": 40,
        "loop_phrase_span_chars": 128,
        "loop_symbol_span_chars": 160,
        "loop_near_repeat_count": 4,
        "loop_near_repeat_window": 12,
    },
    "strict": {
        "description": "Stronger still: no-repeat 3-grams, a firmer windowed penalty, earlier loop cut. "
        "Expect some damage to answers that must repeat.",
        "dry_multiplier": 1.5,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_range": 2048,
        "dry_breakers": ["\n", ":", '"', "*"],
        "ngram_size": 3,
        "ngram_window": 512,
        "rep_penalty": 1.15,
        "rep_window": 128,
        "rep_scope": "output",
        "rep_exempt_digits_punct": True,
        "loop_detection": True,
        "loop_min_sentence_chars": 16,
        "loop_phrase_span_chars": 40,
        "loop_symbol_span_chars": 128,
        "loop_near_repeat_count": 3,
        "loop_near_repeat_window": 16,
    },
}

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_Breaker = Annotated[str, Field(min_length=1, max_length=32)]
_TokenId = Annotated[int, Field(ge=0)]
_Chars = Annotated[int, Field(ge=1, le=65536)]


class PresetError(ValueError):
    """A preset file or preset definition that cannot be used; raised at startup."""


class RepetitionDetection(BaseModel):
    """vLLM's own `repetition_detection` request field (passed through)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    max_pattern_size: int = Field(0, ge=0, le=1024)
    min_pattern_size: int = Field(0, ge=0, le=1024)
    min_count: int = Field(0, ge=0, le=1024)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_pattern_size > self.max_pattern_size:
            raise ValueError("min_pattern_size must be <= max_pattern_size")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise ValueError("min_count must be >= 2 when max_pattern_size > 0")
        return self


class Preset(BaseModel):
    """Every decoding control, all optional; bounds are enforced for files, profiles and requests alike."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    description: str | None = Field(None, max_length=300)

    # DRY ("don't repeat yourself"): penalise continuing a sequence that already occurred.
    dry_multiplier: float | None = Field(None, ge=0, le=5, allow_inf_nan=False)
    dry_base: float | None = Field(None, ge=1, le=4, allow_inf_nan=False)
    dry_allowed_length: int | None = Field(None, ge=1, le=64)
    dry_range: int | None = Field(None, ge=0)
    dry_breakers: list[_Breaker] | None = Field(None, max_length=32)
    dry_scope: Literal["all", "output"] | None = None  # DRY's context: prompt + output (default) or output
    # No-repeat n-gram: no ngram_size-gram twice within the last ngram_window output tokens.
    ngram_size: int | None = Field(None, ge=0, le=32)
    ngram_window: int | None = Field(None, ge=0)
    # Windowed repetition penalty over recent tokens, with exempt tokens.
    rep_penalty: float | None = Field(None, ge=1, le=3, allow_inf_nan=False)
    rep_window: int | None = Field(None, ge=0)
    rep_scope: Literal["output", "all"] | None = None
    rep_exempt: list[_TokenId] | None = Field(None, max_length=4096)
    rep_exempt_digits_punct: bool | None = None
    # Gateway loop detector (governor.stream.loop_detector.LoopConfig).
    loop_detection: bool | None = None
    loop_min_sentence_chars: _Chars | None = None
    loop_phrase_span_chars: _Chars | None = None
    loop_symbol_span_chars: _Chars | None = None
    loop_max_period_chars: Annotated[int, Field(ge=1, le=16384)] | None = None
    loop_near_repeat_count: Annotated[int, Field(ge=2, le=64)] | None = None
    loop_near_repeat_window: Annotated[int, Field(ge=2, le=256)] | None = None
    loop_buffer_chars: Annotated[int, Field(ge=256, le=65536)] | None = None
    # vLLM's own fields, used only when the request does not set them.
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_detection: RepetitionDetection | None = None

    def fields(self) -> dict[str, Any]:
        """The controls this preset sets (description left out), as plain JSON values."""
        return self.model_dump(exclude_none=True, exclude={"description"})


class _PresetEntry(Preset):
    extends: str | None = Field(None, min_length=1, max_length=64)


LOOP_FIELDS: dict[str, str] = {
    "loop_min_sentence_chars": "min_sentence_chars",
    "loop_phrase_span_chars": "phrase_span_chars",
    "loop_symbol_span_chars": "symbol_span_chars",
    "loop_max_period_chars": "max_period_chars",
    "loop_near_repeat_count": "near_repeat_count",
    "loop_near_repeat_window": "near_repeat_window",
    "loop_buffer_chars": "buffer_chars",
}
PASSTHROUGH_FIELDS: tuple[str, ...] = (
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "repetition_detection",
)
# Governor-only controls: a request may override them flat in its body.
CONTROL_FIELDS: frozenset[str] = frozenset(Preset.model_fields) - {"description", *PASSTHROUGH_FIELDS}


def describe_error(exc: ValidationError) -> tuple[str | None, str]:
    """(field, message) of the first pydantic error, the field as the top-level key."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    field = loc[0] if loc else None
    where = f"'{'.'.join(loc)}': " if loc else ""
    return field, f"{where}{first.get('msg', 'invalid value')}"


def builtin_presets() -> dict[str, Preset]:
    """The built-in presets, validated."""
    return {name: Preset.model_validate(fields) for name, fields in BUILTIN_PRESETS.items()}


def parse_presets(data: object, source: str = "presets") -> dict[str, Preset]:
    """Built-ins plus the user presets in `data` ({"name": {fields, "extends": name?}}), extends resolved.

    A user preset may redefine a built-in name; `extends` naming its own name then means the built-in.
    """
    builtins = builtin_presets()
    if not isinstance(data, Mapping):
        raise PresetError(f"{source}: must be a JSON object mapping preset names to fields")
    entries: dict[str, _PresetEntry] = {}
    for name, fields in data.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise PresetError(f"{source}: preset name {name!r} must match {NAME_RE.pattern}")
        if not isinstance(fields, Mapping):
            raise PresetError(f"{source}: preset '{name}' must be a JSON object of fields")
        try:
            entries[name] = _PresetEntry.model_validate(dict(fields))
        except ValidationError as exc:
            raise PresetError(f"{source}: preset '{name}': {describe_error(exc)[1]}") from exc

    resolved: dict[str, Preset] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Preset:
        if name in resolved:
            return resolved[name]
        entry = entries[name]
        merged: dict[str, Any] = {}
        parent = entry.extends
        if parent is not None:
            if parent == name and name in builtins:
                merged = builtins[name].fields()
            elif parent in entries:
                if parent in chain:
                    raise PresetError(f"{source}: presets extend each other in a cycle: {' → '.join((*chain, parent))}")
                merged = resolve(parent, (*chain, parent)).fields()
            elif parent in builtins:
                merged = builtins[parent].fields()
            else:
                known = ", ".join(sorted({*builtins, *entries}))
                raise PresetError(f"{source}: preset '{name}' extends unknown preset '{parent}' (known: {known})")
        merged.update(entry.fields())
        merged.pop("extends", None)
        if entry.description is not None:
            merged["description"] = entry.description
        try:
            preset = Preset.model_validate(merged)
        except ValidationError as exc:  # only cross-field checks can fail here
            raise PresetError(f"{source}: preset '{name}': {describe_error(exc)[1]}") from exc
        resolved[name] = preset
        return preset

    for name in entries:
        resolve(name, (name,))
    return {**builtins, **resolved}


def load_presets(path: Path | str | None) -> dict[str, Preset]:
    """Built-in presets, plus those in the JSON file at `path` when given; errors name file, preset and field."""
    if path is None:
        return builtin_presets()
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PresetError(f"presets file not found: {file}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"cannot read presets file {file}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PresetError(f"{file}: not valid JSON: {exc}") from exc
    return parse_presets(data, str(file))


def read_profile(directory: Path | str) -> dict[str, Any] | None:
    """The `governor.json` profile of a model or adapter folder, or None when it has none."""
    file = Path(directory).expanduser() / "governor.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PresetError(f"{file}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise PresetError(f"{file}: must be a JSON object")
    return data
