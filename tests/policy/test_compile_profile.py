"""Adapter profiles compiled once when the adapter loads: errors name the profile, requests reuse the plan."""

from __future__ import annotations

import pytest

from governor.errors import InvalidRequest
from governor.policy.builder import CompiledProfile
from governor.policy.presets import builtin_presets
from tests.policy.test_builder import CHAT, _policy


def test_compiled_profile_builds_like_the_raw_one() -> None:
    policy = _policy()
    raw = {"preset": "strict", "stop": ["### End"], "dry_multiplier": 0.5}
    compiled = policy.compile_profile(raw)
    assert isinstance(compiled, CompiledProfile)
    for kind in ("chat", "completions"):
        assert policy.build(dict(CHAT), kind=kind, profile=compiled) == policy.build(dict(CHAT), kind=kind, profile=raw)
    assert "### End" in policy.build(dict(CHAT), kind="chat", profile=compiled).body["stop"]


@pytest.mark.parametrize(
    ("profile", "needle"),
    [
        ({"preset": "turbo"}, "turbo"),
        ({"template": "nope"}, "nope"),
        ({"dry_multiplier": "x"}, "dry_multiplier"),
        ({"stop": ["x" * 300]}, "stop"),
    ],
)
def test_bad_profile_fails_at_compile(profile: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        _policy().compile_profile(profile)
    assert err.value.param == "model" and needle in err.value.message and "governor.json" in err.value.message


def test_a_profile_compiled_by_a_replaced_policy_is_recompiled() -> None:
    old, new = _policy(), _policy(default="off")
    compiled = old.compile_profile({"preset": "balanced"})
    assert new.build(dict(CHAT), kind="chat", profile=compiled).preset == "balanced"
    assert set(builtin_presets()) >= {"balanced"}
