"""Who is calling: API keys mapped to client names, or the remote address.

The keys file stores only SHA-256 digests of keys, never the keys::

    clients:
      alice:
        key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        models: [digits]          # absent: every model
      batch-job:
        key_sha256: ...

``guard keygen NAME`` prints a fresh key and the entry to paste. With no keys
file, clients are told apart by address (``addr:127.0.0.1``), which suits a
guard behind a trusted network edge. The policy's ``clients`` section::

    clients:
      keys_file: keys.yaml        # absent: identify clients by address
      header: X-API-Key           # where clients send their key
      trust_forwarded_for: false  # true: one trusted proxy in front (a load balancer);
                                  # the rightmost X-Forwarded-For entry is the client
      # trusted_proxies: 2        # instead: N proxies in a chain, the N-th entry from
                                  # the right; or a list of CIDRs: [10.0.0.0/8, fd00::/8]
                                  # (XFF is read only when the socket peer is inside one;
                                  # entries inside them are skipped from the right)
      ipv6_prefix: 64             # IPv6 clients are one client per /64 (128: per address)

Setting ``trusted_proxies`` implies ``trust_forwarded_for`` (both, with
``trust_forwarded_for: false``, is refused). Entries left of the trusted hops are
whatever the client wrote and never pick its identity; an entry that is not an
address stops the walk at the last trusted hop (see :mod:`guard.forwarded`).
Address identities are normalized (``::ffff:7.7.7.7`` is ``addr:7.7.7.7``;
``addr:2001:db8:1:2::/64`` for IPv6).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from guard import forwarded
from guard.configreader import Section, show
from guard.errors import Forbidden, PolicyError, Unauthorized

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PEERS_KEPT = 4096  # identities of peer addresses remembered (parsing one costs more)


@dataclass(frozen=True, slots=True)
class Client:
    """The identity every stage sees. ``name`` is safe to log; it is never a key."""

    name: str
    models: frozenset[str] | None = None  # None: every model

    def may_call(self, model: str) -> bool:
        return self.models is None or model in self.models


def key_digest(key: str) -> str:
    # surrogateescape: a header that was not UTF-8 still hashes (to no known key).
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    return "gk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ClientDirectory:
    """Maps requests to clients. Built once per policy load."""

    header: str = "X-API-Key"
    keys: Mapping[str, Client] | None = None  # digest -> client; None: identify by address
    trust_forwarded_for: bool = False  # alone: one trusted hop
    trusted_proxies: int | tuple[forwarded.IPNetwork, ...] | None = None  # hops, or networks
    ipv6_prefix: int = 64
    # remote address -> client, when no header can change who a socket's peer is
    _by_peer: dict[str, Client] = field(default_factory=dict, compare=False, repr=False)

    @property
    def uses_keys(self) -> bool:
        return self.keys is not None

    def identify(self, headers: Mapping[str, str], remote: str | None) -> Client:
        if self.keys is None:
            if self.trusted_proxies is None and not self.trust_forwarded_for and remote:
                client = self._by_peer.get(remote)
                if client is None:
                    if len(self._by_peer) >= _PEERS_KEPT:
                        self._by_peer.clear()
                    client = self._by_peer[remote] = Client(f"addr:{self._address({}, remote)}")
                return client
            return Client(f"addr:{self._address(headers, remote)}")
        presented = headers.get(self.header)
        if not presented:
            raise Unauthorized(f"missing API key: send it in the {self.header} header")
        client = self.keys.get(key_digest(presented))
        if client is None:
            raise Unauthorized(f"unknown API key in the {self.header} header")
        return client

    def authorize(self, client: Client, model: str) -> None:
        if not client.may_call(model):
            raise Forbidden(f"client {client.name} may not call model {model}")

    def _address(self, headers: Mapping[str, str], remote: str | None) -> str:
        peer = forwarded.parse_address(remote) if remote else None
        if peer is None:  # not an IP socket: nothing to walk from
            return remote or "unknown"
        trusted = self.trusted_proxies
        if trusted is None and self.trust_forwarded_for:
            trusted = 1
        address = peer
        if trusted is not None:
            getall = getattr(headers, "getall", None)  # every XFF header line, in order
            values = getall(forwarded.HEADER, []) if getall else [headers.get(forwarded.HEADER)]
            address = forwarded.client_address([v for v in values if v], peer, trusted)
        return forwarded.group(address, self.ipv6_prefix)


def read_address_options(section: Section) -> dict[str, Any]:
    """``trust_forwarded_for``, ``trusted_proxies`` and ``ipv6_prefix`` of a policy's
    ``clients`` section, validated, as :class:`ClientDirectory` keyword arguments."""
    trust = section.bool("trust_forwarded_for", None)
    proxies = _trusted_proxies(section)
    if proxies is not None and trust is False:
        raise section.error(
            "trusted_proxies",
            "needs trust_forwarded_for: true (or leave trust_forwarded_for out); "
            "got trust_forwarded_for: false",
        )
    return {
        "trust_forwarded_for": bool(trust) or proxies is not None,
        "trusted_proxies": proxies,
        "ipv6_prefix": section.int("ipv6_prefix", 64, min=1, max=128),
    }


def _trusted_proxies(section: Section) -> int | tuple[forwarded.IPNetwork, ...] | None:
    key = "trusted_proxies"
    raw = section.data.get(key)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return int(section.int(key, min=1))
    if raw is not None and (not isinstance(raw, list) or not raw):
        raise section.error(
            key, f"must be a hop count (an integer >= 1) or a list of CIDRs; got {show(raw)}"
        )
    values = section.str_list(key, None)  # marks the key read; a non-string entry fails here
    if values is None:
        return None
    networks = []
    for i, text in enumerate(values):
        try:
            networks.append(forwarded.parse_network(text))
        except ValueError as exc:
            raise PolicyError(
                f"{section.source}: {section.where(key)}[{i}] must be an IP network in CIDR "
                f"notation (10.0.0.0/8, fd00::/8); got {show(text)} ({exc})"
            ) from exc
    return tuple(networks)


def load_keys(path: Path) -> dict[str, Client]:
    """Read a keys file into digest -> client."""
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"{source}: cannot read keys file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    root = Section(data, source=source)
    clients = root.child("clients", required=True)
    keys: dict[str, Client] = {}
    for name in clients.names():
        entry = clients.child(name)
        digest = entry.str("key_sha256").lower()
        if not _HEX64.match(digest):
            raise entry.error("key_sha256", "must be 64 hex digits (sha256 of the key)")
        models = entry.str_list("models", None)
        entry.finish()
        if digest in keys:
            raise entry.error("key_sha256", f"is also the key of {keys[digest].name}")
        keys[digest] = Client(name, frozenset(models) if models is not None else None)
    root.finish()
    return keys


def token_matches(presented: str | None, digest: str) -> bool:
    """Constant-time check of an admin token against its stored digest."""
    if not presented:
        return False
    return hmac.compare_digest(key_digest(presented), digest)
