"""Per-client quotas: requests and tokens per minute and concurrent requests per API key, and
concurrent requests per client address when the client shows no key. Over a limit → 429 with
Retry-After (openai-python retries those). Keys are identified by a hash, never stored or logged raw.

Tokens are charged when a request is admitted — what it may cost (prompt estimate + max_tokens x
sequences) — and the difference is refunded when it ends, so a burst of concurrent requests cannot
all slip in before any of them is charged. State is bounded: the least recently seen clients are
forgotten beyond `max_clients` (a forgotten client starts again with a full allowance)."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from governor.errors import Overloaded

WINDOW = 60.0
MAX_CLIENTS = 10_000


def key_identity(key: str) -> str:
    """A stable, non-reversible id for a key (quota state, cache salt, logs)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class _Bucket:
    """A token bucket refilled continuously at `rate` per minute up to `rate`."""

    rate: float
    stamp: float
    level: float = field(init=False)

    def __post_init__(self) -> None:
        self.level = self.rate  # a new client starts with a full minute's allowance

    def refill(self, now: float) -> None:
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate / WINDOW)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * WINDOW / self.rate


@dataclass
class _ClientState:
    requests: _Bucket
    tokens: _Bucket
    running: int = 0


@dataclass(frozen=True)
class ClientUsage:
    """One client's standing: requests running and this minute's token allowance left (negative: in debt)."""

    running: int
    tokens_left: float


@dataclass
class QuotaLease:
    """One admitted request's hold on its client's quota; `release` once it ends."""

    quotas: Quotas
    ident: str
    charged: int
    released: bool = False

    def release(self, used_tokens: int) -> None:
        if self.released:
            return
        self.released = True
        self.quotas._release(self.ident, self.charged, used_tokens)


class Quotas:
    """Limits per API key (`key:` ids) and per client address (`addr:` ids); a limit of 0 = unlimited."""

    def __init__(
        self,
        rpm: int,
        tpm: int,
        concurrency: int,
        address_concurrency: int = 0,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm, self.tpm, self.concurrency = rpm, tpm, concurrency
        self.address_concurrency = address_concurrency
        self.max_clients = max_clients
        self.clock = clock  # a test may stop it: refills then never blur what was charged
        self._clients: OrderedDict[str, _ClientState] = OrderedDict()

    @staticmethod
    def client_id(key: str | None, address: str | None) -> str | None:
        """The quota id of a client: its key's hash, else its address, else None (no limits apply)."""
        if key:
            return "key:" + key_identity(key)
        return "addr:" + address if address else None

    def __len__(self) -> int:
        return len(self._clients)

    def usage(self, ident: str) -> ClientUsage | None:
        """Where a client stands now; None for one never seen (or forgotten)."""
        state = self._clients.get(ident)
        if state is None:
            return None
        state.tokens.refill(self.clock())
        return ClientUsage(state.running, state.tokens.level)

    def _state(self, ident: str) -> _ClientState:
        state = self._clients.get(ident)
        if state is None:
            now = self.clock()
            state = self._clients[ident] = _ClientState(_Bucket(float(self.rpm), now), _Bucket(float(self.tpm), now))
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(ident)
        return state

    def acquire(self, ident: str | None, expected_tokens: int) -> QuotaLease | None:
        """Admit one request or raise Overloaded (429, the wait in Retry-After); None when nothing is limited."""
        if ident is None:
            return None
        by_key = ident.startswith("key:")
        concurrency = self.concurrency if by_key else self.address_concurrency
        rpm, tpm = (self.rpm, self.tpm) if by_key else (0, 0)
        if not (concurrency or rpm or tpm):
            return None
        state = self._state(ident)
        now = self.clock()
        if concurrency and state.running >= concurrency:
            who, code = (
                ("API key", "key_concurrency_exceeded") if by_key else ("client address", "concurrency_exceeded")
            )
            raise Overloaded(f"Too many concurrent requests for this {who} (limit {concurrency}).", retry_after=1.0,
                             code=code)  # fmt: skip
        if rpm:
            state.requests.refill(now)
            wait = state.requests.wait_for(1)
            if wait > 0:
                raise Overloaded(f"Request quota of {rpm} per minute exceeded for this API key.",
                                 retry_after=wait, code="rate_limit_exceeded")  # fmt: skip
        charged = 0
        if tpm:
            state.tokens.refill(now)
            if state.tokens.level <= 0:
                raise Overloaded(f"Token quota of {tpm} per minute exceeded for this API key.",
                                 retry_after=state.tokens.wait_for(1), code="token_quota_exceeded")  # fmt: skip
            charged = max(0, expected_tokens)
            state.tokens.level -= charged  # may go negative: later requests wait until it refills
        if rpm:
            state.requests.level -= 1
        state.running += 1
        return QuotaLease(self, ident, charged)

    def _release(self, ident: str, charged: int, used: int) -> None:
        state = self._clients.get(ident)
        if state is None:  # forgotten while it ran (more than max_clients newer clients)
            return
        state.running = max(0, state.running - 1)
        if self.tpm and ident.startswith("key:"):
            state.tokens.refill(self.clock())
            state.tokens.level -= used - charged  # refund what was charged but not used (or charge the excess)
