"""Certification capacity shared between clients: each client's slots and sample share."""

from __future__ import annotations

from guard.stages.capacity import Capacity


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def capacity(clock: Clock, **kw: object) -> Capacity:
    settings: dict[str, object] = {
        "max_concurrent": 3,
        "samples_per_second": None,
        "client_max_concurrent": 1,
        "client_samples_per_second": None,
        **kw,
    }
    return Capacity(clock=clock, **settings)  # type: ignore[arg-type]


def test_a_client_at_its_slots_leaves_the_others_theirs() -> None:
    c = capacity(Clock())
    assert c.try_acquire("mallory", 100) is None
    assert c.try_acquire("mallory", 100) == "1 certifications of this client running"
    assert c.refusal("mallory") is not None
    assert c.try_acquire("alice", 100) is None and c.try_acquire("bob", 100) is None
    assert c.try_acquire("carol", 100) == "3 certifications running"  # the total still holds
    c.release("mallory")
    assert c.running == 2 and c.try_acquire("mallory", 100) is None


def test_a_client_spending_its_share_waits_while_others_spend_theirs() -> None:
    clock = Clock()
    c = capacity(clock, client_max_concurrent=3, client_samples_per_second=1000.0)
    assert c.try_acquire("mallory", 2050) is None  # a full bucket admits one large request
    c.release("mallory")
    assert c.try_acquire("mallory", 2050) == "this client's sample share spent"
    assert c.try_acquire("alice", 2050) is None  # mallory's debt is mallory's
    clock.now = 1.0  # 1,050 - 1,000: still in debt
    assert c.refusal("mallory") == "this client's sample share spent"
    clock.now = 1.1
    assert c.try_acquire("mallory", 2050) is None


def test_the_total_sample_budget_is_charged_too() -> None:
    clock = Clock()
    c = capacity(
        clock,
        client_max_concurrent=3,
        samples_per_second=3000.0,
        client_samples_per_second=1500.0,
    )
    for client in ("a", "b"):
        assert c.try_acquire(client, 2000) is None
        c.release(client)
    assert c.try_acquire("c", 10) == "sample budget spent"  # 3,000 - 4,000


def test_refusal_spends_nothing_and_client_buckets_are_bounded() -> None:
    clock = Clock()
    c = capacity(clock, client_max_concurrent=3, client_samples_per_second=10.0, max_clients=2)
    for _ in range(5):
        assert c.refusal("alice") is None
    assert c.try_acquire("alice", 10) is None
    c.release("alice")
    for name in ("bob", "carol"):
        c.refusal(name)
    assert len(c._buckets) == 2 and "alice" not in c._buckets
    assert c.running == 0 and not c._running


async def test_a_waiting_request_starts_when_a_slot_frees_or_gives_up() -> None:
    import asyncio

    c = Capacity(
        max_concurrent=2,
        samples_per_second=None,
        client_max_concurrent=1,
        client_samples_per_second=None,
    )
    assert await c.acquire("mallory", 100) is None
    waiting = asyncio.create_task(c.acquire("mallory", 100, wait=30.0))
    await asyncio.sleep(0)
    assert not waiting.done()  # her slot is taken: she waits, she is not refused
    c.release("mallory")
    assert await waiting is None and c.running == 1
    refused = await c.acquire("mallory", 100, wait=0.02)  # nobody releases: it gives up
    assert refused == "1 certifications of this client running"


async def test_a_client_in_debt_waits_for_its_bucket_to_refill() -> None:
    c = Capacity(
        max_concurrent=4,
        samples_per_second=None,
        client_max_concurrent=4,
        client_samples_per_second=1000.0,
    )
    assert await c.acquire("mallory", 1020) is None  # 20 samples in debt: 20 ms
    assert await c.acquire("mallory", 10, wait=0.0) == "this client's sample share spent"
    assert await c.acquire("mallory", 10, wait=5.0) is None
