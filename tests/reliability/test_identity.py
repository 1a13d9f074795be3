"""A client that lies about who it is: ``X-Forwarded-For`` through a real guard.

Balancers append to ``X-Forwarded-For``, so everything left of the entries they
wrote is the client's own text. A client that varies it must still be one
client: the same budget, the same detector history. Each test here sends
requests over a real loopback socket (the peer is 127.0.0.1, the balancer in
these scenarios) through a budget of ``LIMIT`` queries, so a second identity
shows as answers past the limit and one identity as the 429 that comes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from guard.loadgen import LoadConfig, run_load
from guard.models import load_samples
from tests.integration.conftest import StartGuard
from tests.reliability.conftest import REPO, digits_model, v2_body

LIMIT = 3
INFER = "/v2/models/digits/infer"


def policy(clients: dict[str, Any], audit: Path) -> dict[str, Any]:
    budget = {"budget": {"limits": [{"queries": LIMIT, "per": "1h"}]}}
    return {
        "version": 1,
        "models": {"digits": digits_model(budget)},
        "clients": clients,
        "audit": {"path": str(audit)},
    }


async def statuses(
    http: aiohttp.ClientSession, url: str, forwarded: Sequence[str | None]
) -> list[int]:
    """One request per entry, in order, each with that X-Forwarded-For (None: none)."""
    body = v2_body(load_samples("digits")[0][:1])
    out = []
    for value in forwarded:
        headers = {"X-Forwarded-For": value} if value is not None else {}
        async with http.post(url, data=body, headers=headers) as reply:
            await reply.read()
            out.append(reply.status)
    return out


async def audited_clients(audit: Path, expected: int) -> set[str]:
    """The client names of the audit log's findings, once ``expected`` records are there."""
    for _ in range(100):
        lines = audit.read_text().splitlines() if audit.exists() else []
        if len(lines) >= expected:
            return {orjson.loads(line)["client"] for line in lines}
        await asyncio.sleep(0.02)
    raise AssertionError(f"{audit} has {len(lines)} records, expected {expected}")


async def guard_url(start_guard: StartGuard, clients: dict[str, Any], audit: Path) -> str:
    server = await start_guard(policy(clients, audit))
    return str(server.make_url(INFER))


async def test_spoofed_leftmost_entries_get_no_fresh_budget(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    url = await guard_url(start_guard, {"trust_forwarded_for": True}, audit)
    sent = [f"6.6.6.{i}, 10.0.0.5" for i in range(12)]
    assert await statuses(http, url, sent) == [200] * LIMIT + [429] * (12 - LIMIT)
    assert await audited_clients(audit, 12 - LIMIT) == {"addr:10.0.0.5"}
    # Another client behind the same balancer is another client.
    assert await statuses(http, url, ["6.6.6.1, 10.0.0.6"]) == [200]


async def test_a_hop_count_takes_the_address_the_farthest_trusted_proxy_saw(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    url = await guard_url(start_guard, {"trusted_proxies": 2}, tmp_path / "audit.jsonl")
    spoofed = [f"6.6.6.{i}, 198.51.100.7, 10.0.0.5" for i in range(8)]
    assert await statuses(http, url, spoofed) == [200] * LIMIT + [429] * (8 - LIMIT)
    # Clients the first proxy saw apart are apart, whatever the second proxy was.
    others = [f"198.51.100.{i}, 10.0.0.{i}" for i in range(20, 26)]
    assert await statuses(http, url, others) == [200] * 6


async def test_trusted_networks_skip_proxies_and_stop_at_the_first_outsider(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clients = {"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]}
    url = await guard_url(start_guard, clients, tmp_path / "audit.jsonl")
    spoofed = [f"6.6.6.{i}, 198.51.100.7, 10.1.2.3, 10.0.0.5" for i in range(8)]
    assert await statuses(http, url, spoofed) == [200] * LIMIT + [429] * (8 - LIMIT)
    # An entry that is not an address stops at the last trusted hop (10.0.0.9 here),
    # never at the garbage or at what lies left of it.
    garbage = [f"6.6.6.{i}, not-an-ip-{i}, 10.0.0.9" for i in range(6)]
    assert await statuses(http, url, garbage) == [200] * LIMIT + [429] * (6 - LIMIT)
    others = [f"198.51.100.{i}, 10.0.0.5" for i in range(30, 35)]
    assert await statuses(http, url, others) == [200] * 5


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    url = await guard_url(start_guard, {"trusted_proxies": ["10.0.0.0/8"]}, audit)
    sent = [f"198.51.100.{i}" for i in range(8)]  # the peer, 127.0.0.1, is no proxy of ours
    assert await statuses(http, url, sent) == [200] * LIMIT + [429] * (8 - LIMIT)
    assert await audited_clients(audit, 8 - LIMIT) == {"addr:127.0.0.1"}


async def test_ipv4_mapped_addresses_are_the_ipv4_client(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    url = await guard_url(start_guard, {"trust_forwarded_for": True}, audit)
    sent = ["7.7.7.7", "::ffff:7.7.7.7", "[::ffff:7.7.7.7]:4711", "7.7.7.7:80", "::FFFF:7.7.7.7"]
    assert await statuses(http, url, sent * 2) == [200] * LIMIT + [429] * (10 - LIMIT)
    assert await audited_clients(audit, 10 - LIMIT) == {"addr:7.7.7.7"}


@pytest.mark.parametrize(("prefix", "grouped"), [(None, True), (48, True), (128, False)])
async def test_ipv6_clients_are_grouped_by_prefix(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    prefix: int | None,
    grouped: bool,
) -> None:
    audit = tmp_path / "audit.jsonl"
    clients: dict[str, Any] = {"trust_forwarded_for": True}
    if prefix is not None:
        clients["ipv6_prefix"] = prefix
    url = await guard_url(start_guard, clients, audit)
    # One /64 (and /48), eight addresses in it, written in non-canonical ways too.
    sent = [f"2001:DB8:0:7:{i:x}::1" for i in range(4)] + [
        f"2001:0db8:0000:0007:0000:0000:0000:{i:x}" for i in range(1, 5)
    ]
    got = await statuses(http, url, sent)
    if grouped:
        assert got == [200] * LIMIT + [429] * (8 - LIMIT)
        network = "2001:db8:0:7::/64" if prefix is None else "2001:db8::/48"
        assert await audited_clients(audit, 8 - LIMIT) == {f"addr:{network}"}
    else:
        assert got == [200] * 8


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ({"trusted_proxies": 0}, "clients.trusted_proxies must be >= 1; got 0"),
        (
            {"trusted_proxies": ["10.0.0.0/8", "192.168.1.1/16"]},
            "clients.trusted_proxies[1] must be an IP network in CIDR notation",
        ),
        ({"ipv6_prefix": 200}, "clients.ipv6_prefix must be <= 128; got 200"),
    ],
)
def test_guard_check_names_file_path_and_value(
    tmp_path: Path, clients: dict[str, Any], message: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        yaml.safe_dump(
            {"version": 1, "models": {"digits": {"model": "builtin:digits"}}, "clients": clients}
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "guard.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert f"{path}: {message}" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "clients", [{"trust_forwarded_for": True}, {"trusted_proxies": ["127.0.0.0/8"]}]
)
async def test_guard_load_still_sends_distinct_clients(
    start_guard: StartGuard, tmp_path: Path, clients: dict[str, Any]
) -> None:
    """``guard load --clients N`` writes one address per client: under either way of
    trusting the sender each is its own client, each within its own budget."""
    limit = 10
    document = policy(clients, tmp_path / "audit.jsonl")
    document["models"]["digits"]["stages"][-1]["budget"]["limits"][0]["queries"] = limit
    server = await start_guard(document)
    base = str(server.make_url("/")).rstrip("/")
    many = await run_load(LoadConfig(url=base, model="digits", rate=100, duration=1, clients=50))
    assert many.statuses == {"200": 100}, many.lines()
    one = await run_load(LoadConfig(url=base, model="digits", rate=100, duration=1, clients=1))
    assert one.statuses == {"200": limit, "429": 100 - limit}, one.lines()
