"""Quotas: charged at admission, refunded at the end, per key or per address, bounded state."""

from __future__ import annotations

import pytest

from governor.api.auth import presented_key
from governor.errors import Overloaded
from governor.serving.quota import Quotas, key_identity


def test_presented_key_and_identity() -> None:
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "Basic abc"}) is None
    assert presented_key({"x-api-key": "k"}) == "k"
    assert key_identity("abc") == key_identity("abc") != key_identity("abd")
    assert "abc" not in (Quotas.client_id("abc", "1.2.3.4") or "")
    assert Quotas.client_id(None, "1.2.3.4") == "addr:1.2.3.4"
    assert Quotas.client_id(None, None) is None


def test_tokens_are_charged_at_admission_and_refunded() -> None:
    q = Quotas(rpm=0, tpm=1000, concurrency=0)
    ident = Quotas.client_id("k", None)
    first = q.acquire(ident, expected_tokens=1200)
    assert first is not None
    with pytest.raises(Overloaded) as err:  # charged up front: the bucket is already negative
        q.acquire(ident, expected_tokens=10)
    assert err.value.code == "token_quota_exceeded"
    first.release(used_tokens=100)  # refund of 1,100 tokens
    second = q.acquire(ident, expected_tokens=10)
    assert second is not None
    second.release(10)
    second.release(10)  # idempotent: no double refund
    assert q._clients[ident].tokens.level == pytest.approx(890, abs=1)  # 1000 - 100 - 10


def test_address_concurrency_applies_without_keys_only() -> None:
    q = Quotas(rpm=0, tpm=0, concurrency=0, address_concurrency=2)
    addr = Quotas.client_id(None, "10.0.0.1")
    leases = [q.acquire(addr, 1), q.acquire(addr, 1)]
    with pytest.raises(Overloaded) as err:
        q.acquire(addr, 1)
    assert err.value.code == "concurrency_exceeded"
    assert q.acquire(Quotas.client_id(None, "10.0.0.2"), 1) is not None  # another address
    assert q.acquire(Quotas.client_id("k", None), 1) is None  # keys: no key limits configured
    leases[0].release(0)  # type: ignore[union-attr]
    assert q.acquire(addr, 1) is not None


def test_state_is_bounded_lru() -> None:
    q = Quotas(rpm=10, tpm=0, concurrency=0, max_clients=100)
    hot = Quotas.client_id("hot", None)
    q.acquire(hot, 0)
    for i in range(500):
        q.acquire(Quotas.client_id(f"k{i}", None), 0)
        if i % 50 == 0:
            q._state(hot)  # seen recently: kept
    assert len(q) == 100
    assert hot in q._clients


def test_rate_limit_gives_retry_after() -> None:
    q = Quotas(rpm=1, tpm=0, concurrency=0)
    ident = Quotas.client_id("k", None)
    q.acquire(ident, 0)
    with pytest.raises(Overloaded) as err:
        q.acquire(ident, 0)
    assert err.value.code == "rate_limit_exceeded" and int(err.value.headers()["Retry-After"]) >= 1
