"""Where detectors and budgets keep what they remember between requests.

The policy's top-level ``state:`` section picks the backend::

    state: {backend: memory, max_clients: 10000, max_bytes: 67108864}   # the default
    state:
      backend: redis
      url: redis://127.0.0.1:6379/0     # or url_env: REDIS_URL (keeps a password out of the file)
      key_prefix: "guard:"
      timeout: 0.2                      # seconds per Redis operation
      cluster: false                    # true: url names one node of a Redis Cluster
      fingerprint_shards: 3             # slots each fingerprint table is spread over
                                        # (default: 3 with cluster: true, else 1;
                                        # best: the number of primaries)
      fingerprint_scope: table          # or client: each client's fingerprints in its own
                                        # table and slot (counts of its own queries only)
      max_connections: 256              # per Redis node; past it an operation fails at once
      username: guard                   # ACL user (default: the URL's, else "default")
      password_env: REDIS_PASSWORD      # its password, from the environment
    state:                              # high availability: the primary found by Sentinel
      backend: redis
      sentinel:
        master: guard                   # the name the sentinels monitor
        addresses: [sentinel-0:26379, sentinel-1:26379, sentinel-2:26379]
        password_env: SENTINEL_PASSWORD # the sentinels' own password (optional)
      url: rediss://redis/0             # optional here: only its scheme (rediss: TLS),
                                        # credentials and database apply

``memory`` serves one guard process (the workers of one ``guard serve --workers N``
share one: :mod:`guard.state.local`); ``redis`` lets every replica see the same
state (a client splitting an attack across replicas is still one client).
``cluster: true`` opens a Redis Cluster client: the URL names any one node (its
database must be 0), the client finds the others and routes each key to its
slot's node; each operation's keys share one hash tag, so one slot. A
fingerprint table, shared by every client, is split by hash value into
``fingerprint_shards`` tables on slots spread over the nodes, so that no node
serves every request of a model (see :meth:`RedisStore.match_fingerprints
<guard.state.redis.RedisStore.match_fingerprints>` for what that changes).
``sentinel:`` asks the sentinels for the primary's address, and again after a
failover: in between, operations fail and the stages apply their ``on_error``.
``rediss://`` connects with TLS (the system's CA certificates; a URL query such
as ``?ssl_cert_reqs=none`` changes that). Secrets come from the environment the
policy was loaded with (``url_env``, ``password_env``), never from the file.
:func:`build_store` opens one; it connects lazily, so building is cheap and
never blocks. Importing this package does not import ``redis``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from guard.configreader import Section
from guard.state.base import FingerprintMatch, StateStore, client_key, hash_tag, together

__all__ = [
    "BACKENDS",
    "FingerprintMatch",
    "SentinelConfig",
    "StateConfig",
    "StateStore",
    "build_store",
    "client_key",
    "hash_tag",
    "read_state_config",
    "together",
]

BACKENDS = ("memory", "redis")
_REDIS_ONLY = (
    "url",
    "url_env",
    "key_prefix",
    "timeout",
    "cluster",
    "fingerprint_shards",
    "username",
    "password_env",
    "sentinel",
    "max_connections",
    "fingerprint_scope",
)
FINGERPRINT_SCOPES = ("table", "client")  # as guard.state.redis.FINGERPRINT_SCOPES
CLUSTER_FINGERPRINT_SHARDS = 3  # one per primary of the smallest cluster; measured in docs
_MEMORY_ONLY = ("max_clients", "max_bytes")


@dataclass(frozen=True, kw_only=True, slots=True)
class SentinelConfig:
    """The ``state.sentinel:`` section: which primary, asked of which sentinels."""

    master: str
    addresses: tuple[tuple[str, int], ...]
    password: str | None = field(default=None, repr=False)  # a secret: never in a repr


@dataclass(frozen=True, kw_only=True, slots=True)
class StateConfig:
    """The ``state:`` section. Equal configs share one open store across reloads."""

    backend: str = "memory"
    url: str | None = field(default=None, repr=False)  # may hold a password
    key_prefix: str = "guard:"
    timeout: float = 0.2
    cluster: bool = False
    fingerprint_shards: int = 1
    sentinel: SentinelConfig | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    max_connections: int = 256
    fingerprint_scope: str = "table"
    max_clients: int = 10_000
    max_bytes: int = 64 << 20


def read_state_config(section: Section, environ: Mapping[str, str]) -> StateConfig:
    """Validate a policy's ``state:`` section (absent: the memory default)."""
    backend = section.choice("backend", BACKENDS, "memory")
    wrong = _MEMORY_ONLY if backend == "redis" else _REDIS_ONLY
    for key in wrong:
        if section.has(key):
            raise section.error(key, f"does not apply to backend {backend}")
    cluster = section.bool("cluster", False)
    sentinel = _sentinel(section, environ) if section.has("sentinel") else None
    if sentinel is not None and cluster:
        raise section.error("sentinel", "and cluster: true exclude each other")
    password_env = section.str("password_env", None)
    config = StateConfig(
        backend=backend,
        url=_redis_url(section, environ, optional=sentinel is not None)
        if backend == "redis"
        else None,
        sentinel=sentinel,
        username=section.str("username", None),
        password=None
        if password_env is None
        else section.variable("password_env", password_env, environ),
        key_prefix=section.str("key_prefix", "guard:"),
        timeout=section.float("timeout", 0.2, gt=0),
        cluster=cluster,
        fingerprint_shards=section.int(
            "fingerprint_shards", CLUSTER_FINGERPRINT_SHARDS if cluster else 1, min=1, max=1024
        ),
        max_connections=section.int("max_connections", 256, min=1, max=100_000),
        fingerprint_scope=section.choice("fingerprint_scope", FINGERPRINT_SCOPES, "table"),
        max_clients=section.int("max_clients", 10_000, min=1),
        max_bytes=section.int("max_bytes", 64 << 20, min=1 << 16),
    )
    if config.cluster and config.url is not None and _database(config.url) not in ("", "0"):
        raise section.error("cluster", "takes database 0 (a Redis Cluster has no other)")
    if config.fingerprint_scope == "client" and section.has("fingerprint_shards"):
        raise section.error("fingerprint_shards", "does not apply to fingerprint_scope client")
    if config.password is not None and config.url is not None and urlsplit(config.url).password:
        raise section.error("password_env", "and a password in the URL: give one of them")
    section.finish()
    return config


def _sentinel(section: Section, environ: Mapping[str, str]) -> SentinelConfig:
    child = section.child("sentinel")
    master = child.str("master")
    addresses = []
    for i, text in enumerate(child.str_list("addresses")):
        host, _, port = str(text).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise child.error(f"addresses[{i}]", f"must be host:port; got {text!r}")
        addresses.append((host.strip("[]"), int(port)))
    if not addresses:
        raise child.error("addresses", "must name at least one sentinel")
    env = child.str("password_env", None)
    password = None if env is None else child.variable("password_env", env, environ)
    child.finish()
    return SentinelConfig(master=master, addresses=tuple(addresses), password=password)


def _database(url: str) -> str:
    """The database number a redis:// URL names (path or ``?db=``); "" for none."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    return path or parse_qs(parts.query).get("db", [""])[0]


def _redis_url(section: Section, environ: Mapping[str, str], *, optional: bool) -> str | None:
    url = section.str("url", None)
    env = section.str("url_env", None)
    if url is None and env is None and optional:
        return None
    if (url is None) == (env is None):
        raise section.error(None, "backend redis takes url or url_env (one of them)")
    if env is not None:
        url = section.variable("url_env", env, environ)
    key = "url" if env is None else "url_env"
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise section.error(key, "must be a redis://, rediss:// or unix:// URL")
    if urlsplit(url).query:
        _check_url_options(section, key, url)
    return str(url)


def _check_url_options(section: Section, key: str, url: str) -> None:
    """Options in the URL's query (``?ssl_ca_certs=...``) go to redis-py's connection: one
    it does not take would fail every operation, so it fails the policy instead."""
    from redis.asyncio.connection import Connection, parse_url

    try:
        options: dict[str, Any] = dict(parse_url(url))
        options.pop("connection_class", Connection)(**options)  # builds, does not connect
    except (TypeError, ValueError) as exc:
        detail = str(exc).split("() ")[-1]  # the option, never the URL (it may hold a password)
        raise section.error(key, f"has an option redis-py does not take: {detail}") from None


def build_store(
    config: StateConfig, *, on_error: Callable[[str], None] | None = None
) -> StateStore:
    """Open the configured store; ``on_error(op)`` is called for each failed operation."""
    if config.backend == "redis":
        from guard.state.redis import RedisStore

        if config.url is None and config.sentinel is None:
            raise ValueError("a redis state config needs a url or a sentinel section")
        return RedisStore(
            config.url,
            key_prefix=config.key_prefix,
            timeout=config.timeout,
            on_error=on_error,
            cluster=config.cluster,
            fingerprint_shards=config.fingerprint_shards,
            sentinel=config.sentinel,
            username=config.username,
            password=config.password,
            max_connections=config.max_connections,
            fingerprint_scope=config.fingerprint_scope,
        )
    import os

    from guard.state.local import SOCKET_ENV, LocalStore

    shared = os.environ.get(SOCKET_ENV)
    if shared:  # a worker of `guard serve --workers N`: the host's state process holds it
        return LocalStore(shared, on_error=on_error)
    from guard.state.memory import MemoryStore

    return MemoryStore(max_clients=config.max_clients, max_bytes=config.max_bytes)
