"""Turns a client body into the upstream body: preset layers, template stops, processor args.

Layers, least to most specific: the server's default preset → the model's profile → the adapter's
profile (governor.json) → the request (`decoding_preset` plus flat field overrides). A layer that
names a preset starts over from that preset; its own fields then apply on top. Stops never replace
each other: template, model, adapter and request stops are merged.

Everything that does not depend on the request's overrides is resolved once per (kind, preset,
profile) and cached, so a request without overrides costs a dict copy and a stop merge.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from governor.endpoint import Kind
from governor.errors import InvalidRequest
from governor.policy.presets import CONTROL_FIELDS, LOOP_FIELDS, PASSTHROUGH_FIELDS, Preset, PresetError, describe_error
from governor.policy.templates import FAMILIES, TemplateFamily, get_family
from governor.policy.tokenizer_info import TokenizerInfo
from governor.policy.xargs import processor_args
from governor.stream.loop_detector import LoopConfig

__all__ = [
    "ENGINE_FIELDS",
    "ENGINE_HOOKS",
    "GOVERNOR_FIELDS",
    "PROFILE_KEYS",
    "CompiledProfile",
    "Policy",
    "PolicyResult",
]

# Body keys the builder consumes: they never reach the engine.
GOVERNOR_FIELDS: frozenset[str] = frozenset({"decoding_preset", *CONTROL_FIELDS})
# Engine hooks Governor sets itself; never copied from a client body unless the operator allows one.
ENGINE_HOOKS: frozenset[str] = frozenset({"vllm_xargs", "logits_processors", "chat_template", "chat_template_kwargs"})
# Every engine-side field a client may not send (the one list): the hooks above, and fields that reach
# into the engine's internals (KV transfer between engines, multimodal processor settings, the engine's
# own request id, raw token ids in place of text).
ENGINE_FIELDS: frozenset[str] = ENGINE_HOOKS | {
    "kv_transfer_params", "ec_transfer_params", "mm_processor_kwargs", "return_tokens_as_token_ids", "request_id",
}  # fmt: skip
# Keys of a profile (governor.json) besides preset fields.
PROFILE_KEYS: frozenset[str] = frozenset({"preset", "template", "stop"})

_MAX_PROFILE_STOPS = 32
_MAX_STOP_CHARS = 256
_CACHE_LIMIT = 4096
_WINDOWS = ("dry_range", "ngram_window", "rep_window")


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """The upstream body, the loop detector settings (None = off) and the base preset's name.

    Values inside `body` may be shared with the policy's cache: replace them, do not mutate them.
    """

    body: dict[str, Any]
    loop: LoopConfig | None
    preset: str


@dataclass(frozen=True, slots=True)
class _Decoding:
    """Compiled controls: merged preset fields and what they turn into upstream."""

    fields: Mapping[str, Any]
    xargs: Mapping[str, Any]
    loop: LoopConfig | None
    defaults: tuple[tuple[str, Any], ...]


@dataclass(frozen=True, slots=True)
class _Plan:
    preset: str
    decoding: _Decoding
    stops: tuple[str, ...]
    stop_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Profile:
    preset: str | None
    template: TemplateFamily | None
    stops: tuple[str, ...]
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CompiledProfile:
    """An adapter profile checked against one policy (`Policy.compile_profile`), ready for `build`."""

    raw: Mapping[str, Any]
    key: bytes
    profile: _Profile
    policy_id: int


def _loop_param(message: str, set_here: Collection[str]) -> str:
    """The loop field to blame for a LoopConfig error: one the caller set, if any."""
    candidates: tuple[str, ...]
    if "near_repeat" in message:
        candidates = ("loop_near_repeat_count", "loop_near_repeat_window")
    elif "buffer" in message:
        candidates = ("loop_max_period_chars", "loop_buffer_chars")
    else:
        candidates = tuple(LOOP_FIELDS)
    return next((c for c in candidates if c in set_here), candidates[-1])


class Policy:
    """The decoding policy of one served model; `build` runs on every request."""

    def __init__(
        self,
        presets: Mapping[str, Preset],
        default_preset: str,
        info: TokenizerInfo,
        max_model_len: int,
        max_stop: int,
        *,
        model_profile: Mapping[str, Any] | None = None,
        allow_engine_fields: Iterable[str] = (),
    ) -> None:
        self.info = info
        self.max_model_len = max_model_len
        self.max_stop = max_stop
        self._strip = GOVERNOR_FIELDS | (ENGINE_FIELDS - set(allow_engine_fields))
        if default_preset not in presets:
            raise PresetError(f"default preset '{default_preset}' is not defined (known: {', '.join(sorted(presets))})")
        self.default_preset = default_preset
        self._presets: dict[str, _Decoding] = {}
        self._exempt_cache: dict[tuple[tuple[int, ...], bool], list[int]] = {}
        for name, preset in presets.items():
            try:
                self._presets[name] = self._compile(preset.fields(), clamp=True)
            except InvalidRequest as exc:
                raise PresetError(f"preset '{name}' does not fit this model: {exc.message}") from exc
        self.descriptions = {name: preset.description or "" for name, preset in presets.items()}
        self._cache: dict[tuple[Any, ...], _Plan] = {}
        self._model: _Profile | None = None
        try:
            if model_profile:
                self._model = self._parse_profile(model_profile)
            self._resolve("chat", None, None)
        except InvalidRequest as exc:
            raise PresetError(f"model profile: {exc.message}") from exc

    @property
    def preset_names(self) -> list[str]:
        return sorted(self._presets)

    @property
    def family(self) -> TemplateFamily:
        """The served model's template family (a model profile's 'template' wins over detection)."""
        return self._model.template if self._model and self._model.template else self.info.family

    def validate_profile(self, profile: Mapping[str, Any]) -> None:
        """Raise InvalidRequest (param 'model') if an adapter profile cannot be used; for the adapter registry."""
        self.compile_profile(profile)

    def compile_profile(self, profile: Mapping[str, Any]) -> CompiledProfile:
        """An adapter's governor.json, checked and compiled when the adapter loads: a bad profile fails the
        adapter once, with the reason (InvalidRequest, param 'model'), instead of every request to it."""
        for kind in ("chat", "completions"):
            self._plan(kind, None, profile)
        key = orjson.dumps(profile, option=orjson.OPT_SORT_KEYS)
        return CompiledProfile(dict(profile), key, self._parse_profile(profile), id(self))

    # -- per request ----------------------------------------------------------------------------

    def build(
        self, body: dict[str, Any], *, kind: Kind, profile: CompiledProfile | Mapping[str, Any] | None = None
    ) -> PolicyResult:
        """The upstream body for a client body; InvalidRequest names the offending field."""
        consumed = [key for key in body if key in self._strip]
        name = body.get("decoding_preset")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest("'decoding_preset' must be a string.", param="decoding_preset")
        plan = self._plan(kind, name, profile)
        decoding = plan.decoding
        overrides = {key: body[key] for key in consumed if key in CONTROL_FIELDS and body[key] is not None}
        if overrides:
            decoding = self._override(decoding, overrides)

        out = dict(body)
        for key in consumed:
            del out[key]
        # `ignore_eos` asks for max_tokens whatever the model says (benchmarks rely on it): the template's
        # end-of-turn stops Governor adds are the model's EOS by another name, so they are left out too.
        template_stops = out.get("ignore_eos") is not True
        if plan.stops and template_stops:
            out["stop"] = self._merge_stops(out.get("stop"), plan.stops)
        if plan.stop_ids and template_stops:
            out["stop_token_ids"] = self._merge_stop_ids(out.get("stop_token_ids"), plan.stop_ids)
        if decoding.xargs:
            client = out.get("vllm_xargs")  # only present when the operator allows it
            out["vllm_xargs"] = {**client, **decoding.xargs} if isinstance(client, dict) else dict(decoding.xargs)
        for key, value in decoding.defaults:
            if out.get(key) is None:
                out[key] = dict(value) if isinstance(value, dict) else value
        return PolicyResult(out, decoding.loop, plan.preset)

    def _override(self, base: _Decoding, overrides: dict[str, Any]) -> _Decoding:
        try:
            layer = Preset.model_validate(overrides)
        except ValidationError as exc:
            field, message = describe_error(exc)
            raise InvalidRequest(message, param=field) from exc
        return self._compile({**base.fields, **layer.fields()}, clamp=False, set_here=overrides)

    def _merge_stops(self, own: object, fixed: tuple[str, ...]) -> list[str]:
        if own is None:
            return list(fixed)
        items = [own] if isinstance(own, str) else own
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise InvalidRequest("'stop' must be a string or a list of strings.", param="stop")
        merged = list(dict.fromkeys([*items, *fixed]))
        limit = max(self.max_stop, len(fixed))
        if len(merged) > limit:
            raise InvalidRequest(
                f"'stop' may hold at most {limit - len(fixed)} strings of your own here: the model's template "
                f"and profile add {len(fixed)} ({', '.join(map(repr, fixed))}) and the limit is {limit}.",
                param="stop",
            )
        return merged

    @staticmethod
    def _merge_stop_ids(own: object, fixed: tuple[int, ...]) -> list[int]:
        if own is None:
            return list(fixed)
        if not isinstance(own, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in own):
            raise InvalidRequest("'stop_token_ids' must be a list of integers.", param="stop_token_ids")
        return list(dict.fromkeys([*own, *fixed]))

    # -- resolution (cached) ----------------------------------------------------------------------

    def _plan(self, kind: Kind, name: str | None, profile: CompiledProfile | Mapping[str, Any] | None) -> _Plan:
        if isinstance(profile, CompiledProfile):
            if profile.policy_id == id(self):  # compiled by this policy: no serialization, no parse
                compiled = profile.profile
                ckey = (kind, name, profile.key)
                return self._cache.get(ckey) or self._new_plan(ckey, kind, name, lambda: compiled)
            profile = profile.raw  # compiled by another Policy (two gateways in one process, tests): parsed again
        try:
            pkey: bytes | None = None if not profile else orjson.dumps(profile, option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise InvalidRequest(f"Adapter profile is not JSON: {exc}", param="model") from exc
        raw = profile
        key = (kind, name, pkey)
        return self._cache.get(key) or self._new_plan(
            key, kind, name, lambda: self._parse_profile(raw) if raw else None
        )

    def _new_plan(
        self, key: tuple[Any, ...], kind: Kind, name: str | None, parse: Callable[[], _Profile | None]
    ) -> _Plan:
        if name is not None and name not in self._presets:
            raise InvalidRequest(
                f"Unknown decoding_preset '{name[:64]}'; known: {', '.join(self.preset_names)}.",
                param="decoding_preset",
            )
        try:
            plan = self._resolve(kind, name, parse())
        except InvalidRequest as exc:
            if exc.param == "decoding_preset":
                raise
            raise InvalidRequest(
                f"The adapter's profile (governor.json) is invalid: {exc.message}", param="model"
            ) from exc
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = plan
        return plan

    def _resolve(self, kind: Kind, name: str | None, adapter: _Profile | None) -> _Plan:
        base = self.default_preset
        fields: dict[str, Any] = dict(self._presets[base].fields)
        changed = False
        for layer in (self._model, adapter):
            if layer is None:
                continue
            if layer.preset is not None:
                base, fields = layer.preset, dict(self._presets[layer.preset].fields)
                changed = True
            if layer.fields:
                fields.update(layer.fields)
                changed = True
        if name is not None:
            base, fields, changed = name, dict(self._presets[name].fields), False
        decoding = self._compile(fields, clamp=True) if changed else self._presets[base]

        family, from_adapter = self.family, False
        if adapter is not None and adapter.template is not None:
            family, from_adapter = adapter.template, True
        use_family = kind == "completions" or from_adapter or family.name != self.info.family.name
        wanted = [
            *(family.stops if use_family else ()),
            *(self._model.stops if self._model else ()),
            *(adapter.stops if adapter else ()),
        ]
        stops: list[str] = []
        stop_ids: list[int] = []
        for stop in dict.fromkeys(wanted):
            # A special token never shows in the output text, so a stop string could not match it.
            token_id = self.info.special_id(stop)
            if token_id is None:
                stops.append(stop)
            elif token_id not in stop_ids:
                stop_ids.append(token_id)
        return _Plan(base, decoding, tuple(stops), tuple(stop_ids))

    def _parse_profile(self, profile: Mapping[str, Any]) -> _Profile:
        preset = profile.get("preset")
        if preset is not None and (not isinstance(preset, str) or preset not in self._presets):
            raise InvalidRequest(f"'preset': unknown preset {preset!r} (known: {', '.join(self.preset_names)})")
        template = None
        raw_template = profile.get("template")
        if raw_template is not None:
            template = get_family(raw_template) if isinstance(raw_template, str) else None
            if template is None:
                known = ", ".join(FAMILIES)
                raise InvalidRequest(f"'template': unknown template {raw_template!r} (known: {known})")
        raw_stop = profile.get("stop")
        stops = [raw_stop] if isinstance(raw_stop, str) else raw_stop or []
        if (
            not isinstance(stops, list)
            or len(stops) > _MAX_PROFILE_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= _MAX_STOP_CHARS for s in stops)
        ):
            raise InvalidRequest(
                f"'stop': must be a list of at most {_MAX_PROFILE_STOPS} strings of 1-{_MAX_STOP_CHARS} characters"
            )
        try:
            layer = Preset.model_validate({k: v for k, v in profile.items() if k not in PROFILE_KEYS})
        except ValidationError as exc:
            raise InvalidRequest(describe_error(exc)[1]) from exc
        return _Profile(preset, template, tuple(stops), layer.fields())

    def _exempt_ids(self, exempt: tuple[int, ...], digits_punct: bool) -> list[int]:
        key = (exempt, digits_punct)
        ids = self._exempt_cache.get(key)
        if ids is None:
            ids = sorted({*exempt, *(self.info.digit_punct_ids if digits_punct else ())})
            if len(self._exempt_cache) >= 64:
                self._exempt_cache.clear()
            self._exempt_cache[key] = ids
        return ids

    def _compile(self, fields: dict[str, Any], *, clamp: bool, set_here: Collection[str] = ()) -> _Decoding:
        """Check fields against this model and turn them into xargs, a LoopConfig and pass-through defaults.

        Windows longer than the context cover everything: layers set by the operator are clamped
        to 0 ("all"), a request asking for one is told it is out of range.
        """
        for window in _WINDOWS:
            value = fields.get(window, 0)
            if value > self.max_model_len:
                if not clamp and window in set_here:
                    raise InvalidRequest(
                        f"'{window}' must be at most max_model_len ({self.max_model_len}).", param=window
                    )
                fields[window] = 0
        vocab = self.info.vocab_size
        exempt = fields.get("rep_exempt") or ()
        if vocab is not None and exempt and max(exempt) >= vocab:
            bad = max(exempt)
            raise InvalidRequest(
                f"'rep_exempt': token id {bad} is outside the vocabulary (size {vocab}).", param="rep_exempt"
            )

        xargs = processor_args(
            fields,
            lambda: self.info.breaker_ids(fields.get("dry_breakers") or ()),
            lambda: self._exempt_ids(tuple(exempt), bool(fields.get("rep_exempt_digits_punct"))),
        )

        loop = None
        if fields.get("loop_detection", False):
            try:
                loop = LoopConfig(**{attr: fields[key] for key, attr in LOOP_FIELDS.items() if key in fields})
            except ValueError as exc:
                param = _loop_param(str(exc), set_here)
                raise InvalidRequest(f"Loop detector settings are inconsistent: {exc}.", param=param) from exc
        defaults = tuple((key, fields[key]) for key in PASSTHROUGH_FIELDS if key in fields)
        return _Decoding(fields, xargs, loop, defaults)
