"""The engine arguments (``vllm_xargs``) that carry a request's decoding fields to Governor's logits processors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from governor.processors import extra_args as xa


def processor_args(
    fields: Mapping[str, Any], breaker_ids: Callable[[], Iterable[int]], exempt_ids: Callable[[], Iterable[int]]
) -> dict[str, Any]:
    """The ``gov_*`` arguments for the controls ``fields`` turn on; the token ids of DRY's breakers and of
    the penalty's exemptions are asked for only when those controls are on."""
    xargs: dict[str, Any] = {}
    if fields.get("dry_multiplier", 0) > 0:
        xargs[xa.DRY_MULTIPLIER] = fields["dry_multiplier"]
        xargs[xa.DRY_BASE] = fields.get("dry_base", xa.DRY_DEFAULT_BASE)
        xargs[xa.DRY_ALLOWED_LENGTH] = fields.get("dry_allowed_length", xa.DRY_DEFAULT_ALLOWED_LENGTH)
        xargs[xa.DRY_RANGE] = fields.get("dry_range", 0)
        breakers = breaker_ids()
        if breakers:
            xargs[xa.DRY_BREAKERS] = xa.encode_ids(breakers)
        xargs[xa.DRY_SCOPE] = fields.get("dry_scope", xa.DRY_SCOPES[0])
    if fields.get("ngram_size", 0) > 0:
        xargs[xa.NGRAM_SIZE] = fields["ngram_size"]
        xargs[xa.NGRAM_WINDOW] = fields.get("ngram_window", 0)
    if fields.get("rep_penalty", 1.0) > 1.0:
        xargs[xa.REP_PENALTY] = fields["rep_penalty"]
        xargs[xa.REP_WINDOW] = fields.get("rep_window", 0)
        xargs[xa.REP_SCOPE] = fields.get("rep_scope", xa.REP_SCOPES[0])
        ids = exempt_ids()
        if ids:
            xargs[xa.REP_EXEMPT] = xa.encode_ids(ids)
    return xargs
