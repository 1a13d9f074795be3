"""The client's address behind proxies: ``X-Forwarded-For`` read the way balancers write it.

Each proxy *appends* the address it received the request from, so the list reads
``client, proxy1, proxy2`` and only its right end was written by proxies the guard
trusts; everything left of them is whatever the client sent. The guard therefore
walks the list from the right, as nginx ``real_ip`` (``real_ip_recursive on``) and
Envoy ``xff_num_trusted_hops`` do:

* a hop count ``N`` (``trust_forwarded_for: true`` is ``N = 1``): the socket peer is
  the nearest trusted proxy; the N-th entry from the right is the client;
* a list of networks: XFF is read at all only when the socket peer is inside one of
  them; then each entry inside a trusted network is a proxy and is skipped, and the
  first one outside is the client.

Failure modes, all towards an address no client chose: an entry that is not an IP
address (or ``unknown``, or garbage) stops the walk at the last trusted hop, whose
address is then the client's; a list shorter than the hop count, or made only of
trusted proxies, ends at its leftmost entry, which a trusted proxy wrote.

Addresses are normalized: IPv4-mapped IPv6 (``::ffff:7.7.7.7``) is the IPv4
address, IPv6 is in canonical text without a zone, and entries with a port
(``7.7.7.7:5000``, ``[2001:db8::1]:443``, as some balancers write) lose the port.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HEADER = "X-Forwarded-For"


@functools.lru_cache(maxsize=4096)  # a peer's address is parsed once, not on every request
def parse_address(text: str) -> IPAddress | None:
    """The normalized address in ``text`` (optionally with a port), or None if it is not one."""
    text = text.strip()
    if text.startswith("["):  # [v6] or [v6]:port
        end = text.find("]")
        if end < 0 or not _is_port(text[end + 1 :], optional=True):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # v4:port (a bare IPv6 address has two colons or more)
        text, _, port = text.partition(":")
        if not _is_port(":" + port, optional=False):
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return normalize(address)


def normalize(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 as IPv4; IPv6 without its zone (``%eth0``)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def parse_network(text: str) -> IPNetwork:
    """A trusted network in CIDR notation (a bare address is a /32 or /128).

    Raises ValueError with the reason. IPv4-mapped networks (``::ffff:10.0.0.0/104``)
    become their IPv4 network, since peers are matched after :func:`normalize`.
    """
    network = ipaddress.ip_network(text.strip(), strict=True)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def client_address(
    forwarded: Iterable[str],
    peer: IPAddress,
    trusted: int | Sequence[IPNetwork],
) -> IPAddress:
    """The client's address: ``forwarded`` is every ``X-Forwarded-For`` header value in
    order, ``peer`` the socket peer, ``trusted`` a hop count or the trusted networks."""
    entries = [entry for value in forwarded for entry in value.split(",")]
    current = peer
    for hop, entry in enumerate(reversed(entries)):
        if isinstance(trusted, int):
            if hop >= trusted:
                break
        elif not any(current in network for network in trusted):
            break
        address = parse_address(entry)
        if address is None:
            break  # not written by a proxy we trust: the last trusted hop answers for it
        current = address
    return current


def group(address: IPAddress, ipv6_prefix: int) -> str:
    """``address`` as a client identity: IPv6 clients grouped by their ``/ipv6_prefix``
    network (one host hands out a /64 to itself as easily as one address)."""
    if isinstance(address, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


def _is_port(text: str, *, optional: bool) -> bool:
    if not text:
        return optional
    digits = text[1:]
    if text[0] != ":" or not (digits.isascii() and digits.isdigit()) or len(digits) > 5:
        return False
    return int(digits) <= 65535
