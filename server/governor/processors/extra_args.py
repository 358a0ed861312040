"""Per-request anti-loop settings carried in ``SamplingParams.extra_args``.

Deliberately free of torch and vLLM imports so the HTTP layer can validate a request (and name
the offending field) without loading the engine stack.

Values are scalars (``str | int | float``) because that is all every supported vLLM passes through:
0.25's ``CompletionRequest`` types ``vllm_xargs`` as ``dict[str, str | int | float]`` and refuses a
list with a 400 (see ``governor.engine.compat``). Token-id lists therefore travel as one
comma-separated string ("198,25"; "" = none), written by :func:`encode_ids` and read back by
:func:`parse_ids`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DRY_MULTIPLIER = "gov_dry_multiplier"
DRY_BASE = "gov_dry_base"
DRY_ALLOWED_LENGTH = "gov_dry_allowed_length"
DRY_RANGE = "gov_dry_range"
DRY_BREAKERS = "gov_dry_breakers"
DRY_SCOPE = "gov_dry_scope"
NGRAM_SIZE = "gov_ngram_size"
NGRAM_WINDOW = "gov_ngram_window"
REP_PENALTY = "gov_rep_penalty"
REP_WINDOW = "gov_rep_window"
REP_SCOPE = "gov_rep_scope"
REP_EXEMPT = "gov_rep_exempt"

DRY_KEYS = (DRY_MULTIPLIER, DRY_BASE, DRY_ALLOWED_LENGTH, DRY_RANGE, DRY_BREAKERS, DRY_SCOPE)
NGRAM_KEYS = (NGRAM_SIZE, NGRAM_WINDOW)
REP_KEYS = (REP_PENALTY, REP_WINDOW, REP_SCOPE, REP_EXEMPT)
ALL_KEYS = frozenset(DRY_KEYS + NGRAM_KEYS + REP_KEYS)

DRY_DEFAULT_BASE = 1.75
DRY_DEFAULT_ALLOWED_LENGTH = 2
REP_SCOPES = ("output", "all")
DRY_SCOPES = ("all", "output")  # the first is the default: DRY's context is prompt + output

ExtraArgs = Mapping[str, object] | None


@dataclass(frozen=True, slots=True)
class DRYConfig:
    """DRY sampler settings for one request (p-e-w's algorithm, as in text-generation-webui)."""

    multiplier: float
    base: float
    allowed_length: int
    range: int  # tokens of the context to look back; 0 = everything
    breakers: frozenset[int]
    include_prompt: bool = True  # the context: prompt + output (scope "all") or the output alone


@dataclass(frozen=True, slots=True)
class NGramConfig:
    """No-repeat n-gram settings: no ``size``-gram may occur twice in the last ``window`` output tokens."""

    size: int
    window: int  # 0 = all output


@dataclass(frozen=True, slots=True)
class RepPenaltyConfig:
    """HF/CTRL-style repetition penalty restricted to a window of recent tokens."""

    penalty: float
    window: int  # 0 = the whole scope
    include_prompt: bool
    exempt: frozenset[int]


def _present(args: ExtraArgs, key: str) -> object | None:
    # A JSON null is treated as "not given" so clients can send every key unconditionally.
    return None if args is None else args.get(key)


def _scope(args: ExtraArgs, key: str, scopes: tuple[str, ...]) -> str:
    """One of `scopes` (the first when absent)."""
    scope = _present(args, key)
    if scope is None:
        return scopes[0]
    if scope not in scopes:
        raise ValueError(f"{key}: must be one of {', '.join(scopes)}, got {scope!r}")
    return str(scope)


def _number(args: ExtraArgs, key: str, default: float) -> float:
    value = _present(args, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{key}: must be finite, got {value}")
    return float(value)


def _integer(args: ExtraArgs, key: str, default: int, minimum: int) -> int:
    value = _present(args, key)
    if value is None:
        return default
    # JSON clients sometimes send 3.0 for 3; accept it rather than fail on a formatting detail.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{key}: must be >= {minimum}, got {value}")
    return value


def encode_ids(ids: Iterable[int]) -> str:
    """Token ids as the scalar ``vllm_xargs`` value :func:`parse_ids` reads: ``[198, 25]`` -> ``"198,25"``."""
    return ",".join(map(str, ids))


def parse_ids(value: object, key: str) -> frozenset[int]:
    """Token ids from an :func:`encode_ids` string (None or "" = none); ValueError names ``key``.

    Lists are refused, not tolerated: Governor is the only producer and always encodes, so a list
    here means something bypassed :func:`encode_ids`. Refusing it makes that regression fail on every
    vLLM version and endpoint (0.32 and 0.25's chat type would pass a list through, 0.25's completions
    type refuses it), so the CPU test suite catches what would otherwise only break on a 0.25 GPU box.
    """
    if value is None:
        return frozenset()
    if not isinstance(value, str):
        raise ValueError(
            f'{key}: must be a comma-separated string of token ids like "198,25", got {type(value).__name__}'
        )
    if not value:
        return frozenset()
    ids: set[int] = set()
    for item in value.split(","):
        # ASCII digits only: int() would also take " 7", "+7", "7_0" and non-ASCII digits.
        if not (item.isascii() and item.isdigit()):
            raise ValueError(f"{key}: token ids must be non-negative integers separated by commas, got {item!r}")
        ids.add(int(item))
    return frozenset(ids)


def _token_ids(args: ExtraArgs, key: str) -> frozenset[int]:
    return parse_ids(_present(args, key), key)


def parse_dry(args: ExtraArgs) -> DRYConfig | None:
    """The request's DRY settings, or None when DRY is off; raises ValueError naming the bad key."""
    if not args:
        return None
    multiplier = _number(args, DRY_MULTIPLIER, 0.0)
    if multiplier < 0:
        raise ValueError(f"{DRY_MULTIPLIER}: must be >= 0, got {multiplier}")
    base = _number(args, DRY_BASE, DRY_DEFAULT_BASE)
    if base < 1:
        raise ValueError(f"{DRY_BASE}: must be >= 1, got {base}")
    config = DRYConfig(
        multiplier=multiplier,
        base=base,
        allowed_length=_integer(args, DRY_ALLOWED_LENGTH, DRY_DEFAULT_ALLOWED_LENGTH, 1),
        range=_integer(args, DRY_RANGE, 0, 0),
        breakers=_token_ids(args, DRY_BREAKERS),
        include_prompt=_scope(args, DRY_SCOPE, DRY_SCOPES) == "all",
    )
    return config if multiplier > 0 else None


def parse_ngram(args: ExtraArgs) -> NGramConfig | None:
    """The request's no-repeat n-gram settings, or None when off; raises ValueError naming the bad key."""
    if not args:
        return None
    config = NGramConfig(size=_integer(args, NGRAM_SIZE, 0, 0), window=_integer(args, NGRAM_WINDOW, 0, 0))
    return config if config.size > 0 else None


def parse_rep_penalty(args: ExtraArgs) -> RepPenaltyConfig | None:
    """The request's windowed repetition penalty, or None when off; raises ValueError naming the bad key."""
    if not args:
        return None
    penalty = _number(args, REP_PENALTY, 1.0)
    if penalty < 1:
        raise ValueError(f"{REP_PENALTY}: must be >= 1, got {penalty}")
    config = RepPenaltyConfig(
        penalty=penalty,
        window=_integer(args, REP_WINDOW, 0, 0),
        include_prompt=_scope(args, REP_SCOPE, REP_SCOPES) == "all",
        exempt=_token_ids(args, REP_EXEMPT),
    )
    return config if penalty > 1 else None
