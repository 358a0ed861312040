"""Per-key quotas: requests and tokens per minute, and concurrent requests. Over a limit → 429 with
Retry-After (openai-python retries those). Keys are identified by a hash, never stored or logged raw."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from governor.errors import Overloaded

WINDOW = 60.0


@dataclass
class _Bucket:
    """A token bucket refilled continuously at `rate` per minute up to `rate`."""

    rate: float
    level: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.rate  # a new key starts with a full minute's allowance

    def refill(self, now: float) -> None:
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate / WINDOW)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * WINDOW / self.rate


@dataclass
class _KeyState:
    requests: _Bucket
    tokens: _Bucket
    running: int = 0


class Quotas:
    """Limits per API key; a limit of 0 means unlimited."""

    def __init__(self, rpm: int, tpm: int, concurrency: int) -> None:
        self.rpm, self.tpm, self.concurrency = rpm, tpm, concurrency
        self._keys: dict[str, _KeyState] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency)

    @staticmethod
    def identity(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _state(self, ident: str) -> _KeyState:
        state = self._keys.get(ident)
        if state is None:
            state = self._keys[ident] = _KeyState(_Bucket(float(self.rpm)), _Bucket(float(self.tpm)))
        return state

    def acquire(self, ident: str) -> None:
        """Admit one request for this key or raise Overloaded(429) with the wait in Retry-After."""
        state = self._state(ident)
        now = time.monotonic()
        if self.concurrency and state.running >= self.concurrency:
            raise Overloaded(f"Too many concurrent requests for this API key (limit {self.concurrency}).",
                             retry_after=1.0, code="key_concurrency_exceeded")  # fmt: skip
        if self.rpm:
            state.requests.refill(now)
            wait = state.requests.wait_for(1)
            if wait > 0:
                raise Overloaded(f"Request quota of {self.rpm} per minute exceeded for this API key.",
                                 retry_after=wait, code="rate_limit_exceeded")  # fmt: skip
            state.requests.level -= 1
        if self.tpm:
            state.tokens.refill(now)
            if state.tokens.level <= 0:
                raise Overloaded(f"Token quota of {self.tpm} per minute exceeded for this API key.",
                                 retry_after=state.tokens.wait_for(1), code="token_quota_exceeded")  # fmt: skip
        state.running += 1

    def release(self, ident: str, tokens: int) -> None:
        """The request ended: free its slot and charge the tokens it used."""
        state = self._state(ident)
        state.running = max(0, state.running - 1)
        if self.tpm and tokens:
            state.tokens.refill(time.monotonic())
            state.tokens.level -= tokens  # may go negative: the next request waits until it refills
