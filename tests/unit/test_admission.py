"""Per-client request slots and decode buckets (guard.admission)."""

from __future__ import annotations

import pytest

from guard.admission import ClientSlots, DecodeMeter
from guard.errors import RateLimited


def test_a_client_holds_at_most_its_limit_and_gets_its_slots_back() -> None:
    slots = ClientSlots()
    with slots.hold("mallory", 2), slots.hold("mallory", 2):
        with pytest.raises(RateLimited), slots.hold("mallory", 2):
            pass
        with slots.hold("alice", 2):  # another client is not affected
            pass
    with slots.hold("mallory", 2), slots.hold("mallory", 2):  # released, even on errors
        pass
    assert slots._held == {}


def test_the_bucket_refills_at_its_rate_and_says_when_to_retry() -> None:
    now = [0.0]
    meter = DecodeMeter(clock=lambda: now[0])
    meter.spend("mallory", 3000, rate=1000, burst=2000)  # allowed once, into debt
    with pytest.raises(RateLimited) as refused:
        meter.spend("mallory", 10, rate=1000, burst=2000)
    assert refused.value.retry_after == pytest.approx(1.0)  # 1,000 bytes of debt at 1,000/s
    meter.spend("alice", 10, rate=1000, burst=2000)  # another client's bucket is its own
    now[0] = 1.5
    meter.spend("mallory", 10, rate=1000, burst=2000)
    meter.debit("mallory", 5000)  # bytes learnt of after reading
    with pytest.raises(RateLimited):
        meter.spend("mallory", 0, rate=1000, burst=2000)


def test_the_buckets_forget_the_least_recently_seen_clients() -> None:
    meter = DecodeMeter(max_clients=3, clock=lambda: 0.0)
    for name in ("a", "b", "c", "d"):
        meter.spend(name, 1, rate=10, burst=10)
    assert list(meter._buckets) == ["b", "c", "d"]
