from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from guard.clients import Client, ClientDirectory, key_digest, load_keys, new_key, token_matches
from guard.config import parse_policy
from guard.errors import Forbidden, PolicyError, Unauthorized
from guard.forwarded import parse_network


def write_keys(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


def test_keys_file_maps_hashed_keys_to_clients(tmp_path: Path) -> None:
    alice, bob = new_key(), new_key()
    path = write_keys(
        tmp_path,
        f"clients:\n  alice:\n    key_sha256: {key_digest(alice)}\n    models: [digits]\n"
        f"  bob:\n    key_sha256: {key_digest(bob).upper()}\n",
    )
    directory = ClientDirectory(keys=load_keys(path))
    a = directory.identify({"X-API-Key": alice}, "10.0.0.1")
    assert a.name == "alice"
    directory.authorize(a, "digits")
    with pytest.raises(Forbidden, match="alice may not call model breast_cancer"):
        directory.authorize(a, "breast_cancer")
    b = directory.identify({"X-API-Key": bob}, None)
    directory.authorize(b, "breast_cancer")  # no models listed: every model


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"X-API-Key": "gk_wrong"}])
def test_missing_or_unknown_key_is_401(tmp_path: Path, headers: dict[str, str]) -> None:
    path = write_keys(tmp_path, f"clients:\n  alice:\n    key_sha256: {key_digest('k')}\n")
    with pytest.raises(Unauthorized, match="X-API-Key") as info:
        ClientDirectory(keys=load_keys(path)).identify(headers, "10.0.0.1")
    assert "gk_wrong" not in str(info.value)  # never echo a presented key


def test_address_identity_and_forwarded_for() -> None:
    assert ClientDirectory().identify({}, "10.1.2.3").name == "addr:10.1.2.3"
    headers = {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
    assert ClientDirectory().identify(headers, "10.0.0.9").name == "addr:10.0.0.9"
    trusting = ClientDirectory(trust_forwarded_for=True)  # one hop: the balancer's entry
    assert trusting.identify(headers, "10.0.0.9").name == "addr:10.0.0.1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clients:\n  a:\n    key_sha256: abc\n", "clients.a.key_sha256 must be 64 hex digits"),
        ("clients:\n  a:\n    key: plain\n", "clients.a.key_sha256 is required"),
        (
            f"clients:\n  a:\n    key_sha256: {'a' * 64}\n  b:\n    key_sha256: {'a' * 64}\n",
            "is also the key of a",
        ),
        ("users: {}\n", "clients is required"),
    ],
)
def test_bad_keys_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_keys(write_keys(tmp_path, text))


def test_admin_token_check() -> None:
    digest = key_digest("s3cret")
    assert token_matches("s3cret", digest)
    assert not token_matches("s3cret ", digest)
    assert not token_matches(None, digest)


def test_forwarded_for_that_is_not_an_address_falls_back_to_the_peer() -> None:
    trusting = ClientDirectory(trust_forwarded_for=True)
    assert (
        trusting.identify({"X-Forwarded-For": "10.0.0.1, <script>"}, "10.0.0.9").name
        == "addr:10.0.0.9"
    )
    assert (
        trusting.identify({"X-Forwarded-For": "<script>, 10.0.0.1"}, "10.0.0.9").name
        == "addr:10.0.0.1"
    )
    assert (
        trusting.identify({"X-Forwarded-For": "2001:db8::1"}, "10.0.0.9").name
        == "addr:2001:db8::/64"
    )


def test_key_that_was_not_utf8_hashes_to_no_known_key() -> None:
    directory = ClientDirectory(keys={key_digest("k"): Client("alice")})
    with pytest.raises(Unauthorized):
        directory.identify({"X-API-Key": "\udcff\udcfe"}, None)


# -- X-Forwarded-For: read from the right ---------------------------------------------------

PROXIES = ("10.0.0.0/8", "fd00::/8")
CIDRS = tuple(parse_network(n) for n in PROXIES)


@pytest.mark.parametrize(
    ("trusted", "peer", "xff", "client"),
    [
        # one trusted hop: the balancer's own entry, whatever the client put left of it
        (1, "10.0.0.2", "6.6.6.1, 10.0.0.5", "10.0.0.5"),
        (1, "10.0.0.2", "6.6.6.1, 6.6.6.2, 198.51.100.7", "198.51.100.7"),
        (1, "10.0.0.2", "", "10.0.0.2"),
        # a chain of two: the second entry from the right
        (2, "10.0.0.2", "6.6.6.1, 198.51.100.7, 10.0.0.5", "198.51.100.7"),
        (
            2,
            "10.0.0.2",
            "198.51.100.7",
            "198.51.100.7",
        ),  # shorter list: its leftmost, a proxy wrote it
        (3, "10.0.0.2", "6.6.6.1, 198.51.100.7, 10.0.0.5, 10.0.0.6", "198.51.100.7"),
        # malformed: the last trusted hop answers for it, never the client's text
        (2, "10.0.0.2", "198.51.100.7, bogus, 10.0.0.5", "10.0.0.5"),
        (1, "10.0.0.2", "198.51.100.7, unknown", "10.0.0.2"),
        (1, "10.0.0.2", "198.51.100.7, 1.2.3.4.5", "10.0.0.2"),
        (1, "10.0.0.2", "198.51.100.7, ", "10.0.0.2"),
        # CIDRs: skip trusted entries from the right, the first untrusted is the client
        (CIDRS, "10.0.0.2", "6.6.6.1, 198.51.100.7, 10.1.1.1, 10.0.0.5", "198.51.100.7"),
        (CIDRS, "10.0.0.2", "198.51.100.7", "198.51.100.7"),
        (CIDRS, "10.0.0.2", "6.6.6.1, 198.51.100.7, garbage, 10.0.0.5", "10.0.0.5"),
        (CIDRS, "10.0.0.2", "10.9.9.9, 10.0.0.5", "10.9.9.9"),  # all proxies: the leftmost
        (CIDRS, "fd00::2", "198.51.100.7, fd00::5", "198.51.100.7"),
        (CIDRS, "::ffff:10.0.0.2", "198.51.100.7", "198.51.100.7"),  # mapped peer, trusted
        # CIDRs: a peer outside them is the client, whatever it sends
        (CIDRS, "203.0.113.9", "198.51.100.7, 10.0.0.5", "203.0.113.9"),
        # normalized: mapped IPv4, ports, brackets, zones, canonical IPv6 (grouped by /64)
        (1, "10.0.0.2", "::ffff:7.7.7.7", "7.7.7.7"),
        (1, "10.0.0.2", "7.7.7.7:51234", "7.7.7.7"),
        (1, "10.0.0.2", "[::ffff:7.7.7.7]:443", "7.7.7.7"),
        (1, "10.0.0.2", "2001:0DB8:0:0:1:0:0:1", "2001:db8::/64"),
        (1, "10.0.0.2", "[2001:db8:0:1::5]", "2001:db8:0:1::/64"),
        (1, "10.0.0.2", "fe80::1%eth0", "fe80::/64"),
        (1, "10.0.0.2", "7.7.7.7:99999", "10.0.0.2"),
        (1, "10.0.0.2", "7.7.7.7:", "10.0.0.2"),
        (1, "10.0.0.2", "[2001:db8::1", "10.0.0.2"),
        (1, "10.0.0.2", "\u0667.7.7.7", "10.0.0.2"),
    ],
)
def test_forwarded_for_is_walked_from_the_right(
    trusted: object, peer: str, xff: str, client: str
) -> None:
    directory = ClientDirectory(trust_forwarded_for=True, trusted_proxies=trusted)  # type: ignore[arg-type]
    assert directory.identify({"X-Forwarded-For": xff}, peer).name == f"addr:{client}"


def test_every_forwarded_for_line_counts_in_order() -> None:
    headers = CIMultiDict(
        [("X-Forwarded-For", "6.6.6.1, 198.51.100.7"), ("x-forwarded-for", "10.0.0.5")]
    )
    one_hop = ClientDirectory(trust_forwarded_for=True)
    assert one_hop.identify(CIMultiDictProxy(headers), "10.0.0.2").name == "addr:10.0.0.5"
    two_hops = ClientDirectory(trusted_proxies=2)
    assert two_hops.identify(CIMultiDictProxy(headers), "10.0.0.2").name == "addr:198.51.100.7"


def test_spoofed_leftmost_entries_all_map_to_one_client() -> None:
    directory = ClientDirectory(trust_forwarded_for=True)
    names = {
        directory.identify({"X-Forwarded-For": f"6.6.6.{i}, 10.0.0.5"}, "10.0.0.2").name
        for i in range(50)
    }
    assert names == {"addr:10.0.0.5"}


@pytest.mark.parametrize(
    ("prefix", "a", "b", "same"),
    [
        (64, "2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),
        (64, "2001:db8:1:2::1", "2001:db8:1:3::1", False),
        (48, "2001:db8:1:2::1", "2001:db8:1:3::1", True),
        (128, "2001:db8:1:2::1", "2001:db8:1:2::2", False),
        (64, "192.0.2.1", "192.0.2.2", False),  # IPv4 stays per address
    ],
)
def test_ipv6_clients_are_grouped_by_prefix(prefix: int, a: str, b: str, same: bool) -> None:
    directory = ClientDirectory(ipv6_prefix=prefix)
    assert (directory.identify({}, a).name == directory.identify({}, b).name) is same


def test_default_address_identity_groups_ipv6_by_64_and_unmaps_ipv4() -> None:
    directory = ClientDirectory()
    assert directory.identify({}, "2001:db8::7").name == "addr:2001:db8::/64"
    assert directory.identify({}, "::ffff:192.0.2.1").name == "addr:192.0.2.1"
    assert directory.identify({}, None).name == "addr:unknown"


def policy_with(clients: dict[str, object]) -> dict[str, object]:
    return {"version": 1, "models": {"digits": {"model": "builtin:digits"}}, "clients": clients}


@pytest.mark.parametrize(
    ("clients", "expected"),
    [
        ({"trust_forwarded_for": True}, (True, None, 64)),
        ({"trusted_proxies": 3}, (True, 3, 64)),
        ({"trust_forwarded_for": True, "trusted_proxies": 2}, (True, 2, 64)),
        (
            {"trusted_proxies": ["10.0.0.0/8", "::ffff:172.16.0.0/108", "fd00::1"]},
            (
                True,
                (
                    ipaddress.ip_network("10.0.0.0/8"),
                    ipaddress.ip_network("172.16.0.0/12"),
                    ipaddress.ip_network("fd00::1/128"),
                ),
                64,
            ),
        ),
        ({"ipv6_prefix": 56}, (False, None, 56)),
        ({}, (False, None, 64)),
    ],
)
def test_policy_reads_the_address_options(
    clients: dict[str, object], expected: tuple[object, ...]
) -> None:
    directory = parse_policy(policy_with(clients), source="p.yaml", base=Path(".")).clients
    assert (
        directory.trust_forwarded_for,
        directory.trusted_proxies,
        directory.ipv6_prefix,
    ) == expected


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ({"trusted_proxies": 0}, "p.yaml: clients.trusted_proxies must be >= 1; got 0"),
        (
            {"trusted_proxies": True},
            "p.yaml: clients.trusted_proxies must be a hop count .* got True",
        ),
        (
            {"trusted_proxies": "10.0.0.0/8"},
            "clients.trusted_proxies must be a hop count .* or a list of CIDRs; got '10.0.0.0/8'",
        ),
        ({"trusted_proxies": []}, "clients.trusted_proxies must be a hop count .*; got \\[\\]"),
        (
            {"trusted_proxies": [8]},
            "clients.trusted_proxies must be a list of strings; got \\[8\\]",
        ),
        (
            {"trusted_proxies": ["10.0.0.0/8", "10.0.0.5/8"]},
            "p.yaml: clients.trusted_proxies\\[1\\] must be an IP network in CIDR notation .* got '10.0.0.5/8' \\(.*host bits set",
        ),
        (
            {"trusted_proxies": ["10.0.0.300/8"]},
            "clients.trusted_proxies\\[0\\] must be an IP network .*got '10.0.0.300/8'",
        ),
        (
            {"trust_forwarded_for": False, "trusted_proxies": 2},
            "clients.trusted_proxies needs trust_forwarded_for: true",
        ),
        ({"ipv6_prefix": 0}, "clients.ipv6_prefix must be >= 1; got 0"),
        ({"ipv6_prefix": 129}, "clients.ipv6_prefix must be <= 128; got 129"),
        ({"trusted_proxy": 1}, "clients has unknown key\\(s\\) trusted_proxy"),
    ],
)
def test_policy_refuses_bad_address_options(clients: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(policy_with(clients), source="p.yaml", base=Path("."))
