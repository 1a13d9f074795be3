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
guard behind a trusted network edge; behind a load balancer set
``trust_forwarded_for`` so the first ``X-Forwarded-For`` hop is used.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from guard.configreader import Section
from guard.errors import Forbidden, PolicyError, Unauthorized

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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
    trust_forwarded_for: bool = False

    @property
    def uses_keys(self) -> bool:
        return self.keys is not None

    def identify(self, headers: Mapping[str, str], remote: str | None) -> Client:
        if self.keys is None:
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
        if self.trust_forwarded_for:
            forwarded = headers.get("X-Forwarded-For")
            if forwarded:
                hop = forwarded.split(",", 1)[0].strip()
                try:  # a client name must be an address: it reaches logs and the audit
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    pass
        return remote or "unknown"


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
