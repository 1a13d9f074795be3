"""The Redis state store: one state for every guard replica.

Each operation is one round trip and atomic: a Lua script (counters, budgets,
histories, fingerprints) or a single command. Times come from Redis's own
clock where a script needs one (``TIME``), so replicas with skewed clocks agree.
Keys are ``<key_prefix><key>``; a client's keys carry its hash tag, a
fingerprint table's keys the table's, so every script touches one Cluster slot.

``sentinel`` opens a client of the primary that :mod:`redis.asyncio.sentinel`
finds: after a failover its connections fail (the demoted primary answers
``READONLY``, which closes them) and the next ones go to the new primary.
``cluster=True`` opens a :class:`redis.asyncio.cluster.RedisCluster` on the
URL's node: it learns the slot map from it, sends each command to the node of
its key's slot and follows ``MOVED``/``ASK`` as slots move. A single-node client
pointed at a Cluster node gets ``MOVED`` for most keys: the error then says to
set ``cluster: true``.

``fingerprint_scope="client"`` keeps each client's fingerprints in a table of its own,
in the client's slot: one script on one node a request, so fingerprints spread over a
cluster with the clients and no node serves every request of a model. The price: the
counts cover the client's own queries only (``matches`` equals ``client_matches``), and
an exact repeat is one of the client's own earlier queries. Blacklight decides on the
client's own matches, so its verdicts do not change; its findings no longer say how many
other clients' queries matched.

Any failure (refused, reset, timed out, an error reply) raises
:class:`~guard.errors.StateUnavailable` and is counted through ``on_error``.
After a connection failure the store answers :class:`StateUnavailable` at once
for ``backoff_s`` instead of making every request wait for a dead server, then
tries again: ``redis.asyncio`` reconnects on the next command. On a cluster the
backoff is per node (per slot until the slot map is known): a dead node's
clients wait it out, the other nodes' clients are served. Past
``max_connections`` open connections (per node) an operation fails at once, as
"busy", without the backoff: the server is not down, this process is saturated.

Lua numbers are doubles: counters and budgets are exact up to 2**53.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from guard.errors import StateUnavailable
from guard.state import SentinelConfig
from guard.state.base import LOG_START_BITS, FingerprintMatch, client_key, hash_tag
from guard.state.resp import RespClient, lean_url

__all__ = ["FINGERPRINT_SCOPES", "RedisStore"]

# "table": one table per name, shared by every client (optionally sharded); "client": each
# client's own table, in its slot (matches then count the client's own queries only).
FINGERPRINT_SCOPES = ("table", "client")

# KEYS[1] counter; ARGV amount, window (ms). A new window starts at the first increment.
_INCR = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return {n, ttl}
"""

# KEYS[1] budget; ARGV amount, limit, window (ms, or '' for none).
_SPEND = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if used + amount > tonumber(ARGV[2]) then
  return {0, used}
end
used = redis.call('INCRBY', KEYS[1], amount)
if ARGV[3] ~= '' and redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {1, used}
"""

# KEYS[1] history; ARGV cap, ttl (ms), items. A script rather than MULTI: one command, which
# a cluster client sends as cheaply as any other (its MULTI pipelines cost a thread a command).
_PUSH = """
local n = redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return n
"""

# One fingerprint table, or one shard of it (see RedisStore.match_fingerprints).
# KEYS[1]: <base>:idx, the index (hash -> "qid qid ..."); the script derives the table's other
#       keys, all with the same hash tag (one slot): <base>:q queries (qid -> "ms hashes digest
#       id client"), :meta (seq, head), :d digests (digest -> qid), :n sizes (zset client ->
#       queries held), :o:<client> each client's queries, oldest first.
# ARGV: client; "threshold max_queries ttl_ms max_per_hash expire_per_insert max_per_client
#       detail" (detail 1: return every earlier query sharing a hash, for the caller to add
#       up over shards); then per fingerprint three: its digest ('-' for none), its id
#       across shards ('-' for none), its hashes (16 hex digits each, concatenated).
# Few arguments whatever the number of hashes: encoding them is most of a call's client cost.
# Returns per fingerprint {matches, client_matches, best, repeat}, or with detail {repeat,
# "id shared flags id shared flags ..."} (flags: 1 live, 3 live and the same client).
# Mirrors MemoryStore.
_FINGERPRINTS = """
local idx = KEYS[1]
local base = string.sub(idx, 1, -5)
local qs, meta, digs, sizes = base .. ':q', base .. ':meta', base .. ':d', base .. ':n'
local owners = base .. ':o:'
local client = ARGV[1]
local p = {}
for w in string.gmatch(ARGV[2], '%S+') do p[#p + 1] = tonumber(w) end
local threshold, max_queries, ttl, max_per_hash = p[1], p[2], p[3], p[4]
local expire_per_insert, share, detail = p[5], p[6], p[7] == 1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counters = redis.call('HMGET', meta, 'seq', 'head')
local seq = tonumber(counters[1] or '0')
local head = tonumber(counters[2] or '1')
local held = redis.call('HLEN', qs)

-- The index is read and written a fingerprint at a time (HMGET, HSET, HDEL of many
-- fields: one command each instead of one per hash), in slices that stay within
-- Lua's limit on unpacked arguments.
local SLICE = 256  -- even: HSET takes field-value pairs
local function split(packed)
  local hashes = {}
  for i = 1, #packed, 16 do hashes[#hashes + 1] = string.sub(packed, i, i + 15) end
  return hashes
end
local function postings(hashes)
  local got = {}
  for i = 1, #hashes, SLICE do
    local part = redis.call('HMGET', idx, unpack(hashes, i, math.min(i + SLICE - 1, #hashes)))
    for j = 1, #part do got[#got + 1] = part[j] end
  end
  return got
end
local function each_slice(command, args)
  for i = 1, #args, SLICE do
    redis.call(command, idx, unpack(args, i, math.min(i + SLICE - 1, #args)))
  end
end

local function evict(qid)
  local rec = redis.call('HGET', qs, qid)
  if not rec then return end
  redis.call('HDEL', qs, qid)
  held = held - 1
  local packed, digest, who = string.match(rec, '^%d+ (%x*) (%S+) %S+ (.*)$')
  local sid = tostring(qid)
  local hashes = split(packed)
  local got = postings(hashes)
  local put, gone, done = {}, {}, {}
  for i, h in ipairs(hashes) do
    local ids = got[i]
    if ids and not done[h] then
      done[h] = true
      local kept = {}
      for id in string.gmatch(ids, '%d+') do
        if id ~= sid then kept[#kept + 1] = id end
      end
      if #kept == 0 then gone[#gone + 1] = h
      else put[#put + 1] = h; put[#put + 1] = table.concat(kept, ' ') end
    end
  end
  each_slice('HDEL', gone)
  each_slice('HSET', put)
  if digest ~= '-' and redis.call('HGET', digs, digest) == sid then
    redis.call('HDEL', digs, digest)
  end
  redis.call('LREM', owners .. who, 1, sid)
  if tonumber(redis.call('ZINCRBY', sizes, -1, who)) <= 0 then
    redis.call('ZREM', sizes, who)
  end
end

local out = {}
for a = 3, #ARGV, 3 do
  local digest, gid, packed = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local repeated = false
  if digest ~= '-' then
    local seen = redis.call('HGET', digs, digest)
    if seen then
      local rec = redis.call('HGET', qs, seen)
      if rec and tonumber(string.match(rec, '^(%d+)')) > now - ttl then
        repeated = true
      else
        evict(tonumber(seen))
        redis.call('HDEL', digs, digest)
      end
    end
  end
  if repeated then
    if detail then out[#out + 1] = {1, ''} else out[#out + 1] = {0, 0, 0, 1} end
  else
    local hashes = split(packed)
    local got = postings(hashes)
    local shared = {}
    for i = 1, #hashes do
      if got[i] then
        for id in string.gmatch(got[i], '%d+') do shared[id] = (shared[id] or 0) + 1 end
      end
    end
    local matches, own, best = 0, 0, 0
    local found = {}
    for id, n in pairs(shared) do
      if n > best then best = n end
      if detail or n > threshold then
        local rec = redis.call('HGET', qs, id)
        local at, other, who = string.match(rec, '^(%d+) %x* %S+ (%S+) (.*)$')
        local flags = 0
        if tonumber(at) > now - ttl then flags = (who == client) and 3 or 1 end
        if n > threshold and flags > 0 then
          matches = matches + 1
          if flags == 3 then own = own + 1 end
        end
        if detail then found[#found + 1] = other .. ' ' .. n .. ' ' .. flags end
      end
    end
    seq = seq + 1
    local rec = now .. ' ' .. packed .. ' ' .. digest .. ' ' .. gid .. ' ' .. client
    redis.call('HSET', qs, seq, rec)
    held = held + 1
    if digest ~= '-' then redis.call('HSET', digs, digest, seq) end
    -- Each hash's posting gains this query, the oldest dropped past max_per_hash; a hash
    -- given twice gains it twice, as if posted in turn.
    local posted, order = {}, {}
    for i, h in ipairs(hashes) do
      local ids = posted[h]
      if ids == nil then
        ids = got[i]
        order[#order + 1] = h
      end
      if ids then
        local _, count = string.gsub(ids, ' ', ' ')
        if count + 1 >= max_per_hash then ids = string.match(ids, '^%d+ (.*)$') or '' end
        if ids == '' then ids = tostring(seq) else ids = ids .. ' ' .. seq end
      else
        ids = tostring(seq)
      end
      posted[h] = ids
    end
    local put = {}
    for _, h in ipairs(order) do put[#put + 1] = h; put[#put + 1] = posted[h] end
    each_slice('HSET', put)
    local mine = owners .. client
    redis.call('RPUSH', mine, seq)
    redis.call('ZINCRBY', sizes, 1, client)
    while redis.call('LLEN', mine) > share do
      evict(tonumber(redis.call('LINDEX', mine, 0)))
    end
    local guard = 0
    while held > max_queries and guard < 64 do
      guard = guard + 1
      local top = redis.call('ZREVRANGE', sizes, 0, 0, 'WITHSCORES')
      if #top == 0 then break end
      -- ties go to the smallest name, as in MemoryStore
      local who = redis.call('ZRANGEBYSCORE', sizes, top[2], top[2], 'LIMIT', 0, 1)[1]
      local oldest = redis.call('LINDEX', owners .. who, 0)
      if oldest then evict(tonumber(oldest)) else redis.call('ZREM', sizes, who) end
    end
    for _ = 1, expire_per_insert do
      if head >= seq then break end
      local rec = redis.call('HGET', qs, head)
      if rec and tonumber(string.match(rec, '^(%d+)')) > now - ttl then break end
      evict(head)
      head = head + 1
    end
    redis.call('PEXPIRE', mine, ttl)
    if detail then out[#out + 1] = {0, table.concat(found, ' ')}
    else out[#out + 1] = {matches, own, best, 0} end
  end
end
redis.call('HSET', meta, 'seq', seq, 'head', head)
for _, key in ipairs({idx, qs, meta, digs, sizes}) do redis.call('PEXPIRE', key, ttl) end
return out
"""


_SLOTS = 16384  # Redis Cluster's hash slots


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


async def _pipeline(client: aioredis.Redis, commands: dict[int, list[Any]]) -> dict[int, Any]:
    """``EVALSHA`` each command in one non-transactional pipeline: one round trip."""
    async with client.pipeline(transaction=False) as pipe:
        for args in commands.values():
            pipe.evalsha(*args)
        replies = await pipe.execute(raise_on_error=False)
    return dict(zip(commands, replies, strict=True))


class RedisStore:
    """:class:`~guard.state.base.StateStore` on a Redis server (``redis.asyncio``)."""

    backend = "redis"
    shared = True
    same_master = False  # replicas on any host

    def __init__(
        self,
        url: str | None,
        *,
        key_prefix: str = "guard:",
        timeout: float = 0.2,
        backoff_s: float = 0.5,
        on_error: Callable[[str], None] | None = None,
        expire_per_insert: int = 8,
        cluster: bool = False,
        fingerprint_shards: int = 1,
        sentinel: SentinelConfig | None = None,
        username: str | None = None,
        password: str | None = None,
        max_connections: int = 256,
        fingerprint_scope: str = "table",
    ) -> None:
        if fingerprint_shards < 1:
            raise ValueError("fingerprint_shards must be >= 1")
        if fingerprint_scope not in FINGERPRINT_SCOPES:
            raise ValueError(f"fingerprint_scope must be one of {', '.join(FINGERPRINT_SCOPES)}")
        self.fingerprint_scope = fingerprint_scope
        self.key_prefix = key_prefix
        self.backoff_s = backoff_s
        self.cluster = cluster
        self.fingerprint_shards = fingerprint_shards
        self.max_connections = max_connections
        self._bases: dict[str, list[str]] = {}
        self._on_error = on_error
        self._expire_per_insert = expire_per_insert
        self._down_until: dict[str, float] = {}  # per node ("" for a single server)
        # No retries: a request must not wait out backoffs; the next request reconnects.
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
            "max_connections": max_connections,
        }
        if username is not None:
            options["username"] = username
        if password is not None:
            options["password"] = password
        self._redis: Any
        self._sentinel: Sentinel | None = None
        if sentinel is not None:
            # The URL (optional) brings the scheme, credentials and database; the sentinels
            # give the address, asked again after each failover.
            params: dict[str, Any] = dict(parse_url(url or "redis://sentinel/0"))
            params.pop("host", None)
            params.pop("port", None)
            if params.pop("connection_class", None) is SSLConnection:
                params["ssl"] = True
            self._sentinel = Sentinel(
                sentinel.addresses,
                sentinel_kwargs={
                    "socket_timeout": timeout,
                    "socket_connect_timeout": timeout,
                    "password": sentinel.password,
                },
            )
            self._redis = self._sentinel.master_for(sentinel.master, **(params | options))
        elif url is None:
            raise ValueError("RedisStore needs a url, or a sentinel")
        elif cluster:
            # Slots of a dead node fail; the others are served (the server decides too:
            # cluster-require-full-coverage).
            self._redis = RedisCluster.from_url(url, require_full_coverage=False, **options)
        elif lean_url(url):  # one plain server: our own pipelined client (guard/state/resp.py)
            credentials = {"username": username, "password": password}
            self._redis = RespClient.from_url(
                url,
                timeout=timeout,
                max_pending=max_connections,
                **{k: v for k, v in credentials.items() if v is not None},
            )
        else:
            self._redis = aioredis.Redis.from_url(url, **options)
        self._incr = self._redis.register_script(_INCR)
        self._spend = self._redis.register_script(_SPEND)
        self._fingerprints = self._redis.register_script(_FINGERPRINTS)
        self._push = self._redis.register_script(_PUSH)
        self._append_bytes = self._redis.register_script(_APPEND_BYTES)
        self._append_log = self._redis.register_script(_APPEND_LOG)
        self._node_clients: dict[str, aioredis.Redis] = {}  # cluster: a plain client per node

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    def _node(self, key: str) -> str:
        """Where ``key`` lives, for the backoff: its node's name on a cluster."""
        if not self.cluster:
            return ""
        try:
            node = self._redis.get_node_from_key(key)
        except (RedisError, RedisClusterException, LookupError):
            node = None
        return f"slot {self._redis.keyslot(key)}" if node is None else str(node.name)

    async def _run(
        self, op: str, call: Callable[[], Any], key: str, *, node: str | None = None
    ) -> Any:
        """Await ``call()`` (commands on ``key``'s node, or on several: then ``node`` names
        them all for the backoff), turning every Redis failure into StateUnavailable."""
        node = self._node(key) if node is None else node
        if time.monotonic() < self._down_until.get(node, 0.0):
            self._failed(op)
            raise StateUnavailable("state store unavailable (redis: reconnecting)")
        try:
            return await call()
        except MaxConnectionsError as exc:  # this process's own limit: the server is fine
            self._failed(op)
            raise StateUnavailable(
                f"state store busy (redis: {self.max_connections} connections in use)"
            ) from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._down_until[node] = time.monotonic() + self.backoff_s
            self._failed(op)
            raise StateUnavailable(
                f"state store unavailable (redis: {type(exc).__name__})"
            ) from exc
        except AskError as exc:  # MOVED or ASK reached us: a single-node client on a cluster
            self._failed(op)
            raise StateUnavailable(
                f"state store error (redis: {type(exc).__name__}; the server is a Redis"
                " Cluster node: set cluster: true in the state section)"
            ) from exc
        except (ClusterDownError, RedisClusterException) as exc:  # a slot not served now
            self._down_until[node] = time.monotonic() + self.backoff_s
            self._failed(op)
            raise StateUnavailable(
                f"state store unavailable (redis: {type(exc).__name__})"
            ) from exc
        except RedisError as exc:
            self._failed(op)
            raise StateUnavailable(f"state store error (redis: {type(exc).__name__})") from exc

    def _failed(self, op: str) -> None:
        if self._on_error is not None:
            self._on_error(op)

    # -- counters, budgets, marks ------------------------------------------------
    async def incr(self, key: str, amount: int, window_s: float) -> tuple[int, float]:
        full = self._key(key)
        count, ttl_ms = await self._run(
            "incr", lambda: self._incr(keys=[full], args=[int(amount), _ms(window_s)]), full
        )
        return int(count), int(ttl_ms) / 1000

    async def spend(
        self, key: str, amount: int, limit: int, window_s: float | None
    ) -> tuple[bool, int]:
        window = "" if window_s is None else _ms(window_s)
        full = self._key(key)
        ok, used = await self._run(
            "spend", lambda: self._spend(keys=[full], args=[int(amount), int(limit), window]), full
        )
        return bool(ok), int(used)

    async def mark(self, key: str, ttl_s: float) -> None:
        full = self._key(key)
        await self._run("mark", lambda: self._redis.set(full, b"1", px=_ms(ttl_s)), full)

    async def marked(self, key: str) -> bool:
        full = self._key(key)
        return bool(await self._run("marked", lambda: self._redis.exists(full), full))

    # -- histories ----------------------------------------------------------------
    async def push(self, key: str, items: Sequence[bytes], cap: int, ttl_s: float) -> int:
        if not items:
            return len(await self.items(key))
        full = self._key(key)
        args = [cap, _ms(ttl_s), *items]
        length = await self._run("push", lambda: self._push(keys=[full], args=args), full)
        return min(int(length), cap)

    async def items(self, key: str) -> list[bytes]:
        full = self._key(key)
        return list(await self._run("items", lambda: self._redis.lrange(full, 0, -1), full))

    # -- fingerprints ---------------------------------------------------------------
    async def match_fingerprints(
        self,
        table: str,
        client: str,
        fingerprints: Sequence[Sequence[int]],
        *,
        threshold: int,
        max_queries: int,
        ttl_s: float,
        max_per_hash: int,
        digests: Sequence[bytes] | None = None,
        max_per_client: int | None = None,
    ) -> list[FingerprintMatch]:
        if not fingerprints:
            return []
        share = max_queries if max_per_client is None else min(max_per_client, max_queries)
        bounds = f"{threshold} {max_queries} {_ms(ttl_s)} {max_per_hash} "
        bounds += f"{self._expire_per_insert} {share}"
        hexes = [_hex(hashes) for hashes in fingerprints]
        marks = ["-"] * len(fingerprints) if digests is None else [bytes(d).hex() for d in digests]
        if self.fingerprint_scope == "client" or self.fingerprint_shards == 1:
            if self.fingerprint_scope == "client":  # the client's own table, in its slot
                key = self._key(client_key(client, "fp", table)) + ":idx"
            else:
                key = self._key(hash_tag(table)) + ":idx"
            args: list[Any] = [client, bounds + " 0"]
            for digest, text in zip(marks, hexes, strict=True):
                args.extend((digest, "-", text))
            rows = await self._run(
                "fingerprints", lambda: self._fingerprints(keys=[key], args=args), key
            )
            return [FingerprintMatch(int(m), int(c), int(b), bool(r)) for m, c, b, r in rows]
        return await self._match_sharded(table, client, fingerprints, hexes, marks, bounds)

    async def _match_sharded(
        self,
        table: str,
        client: str,
        fingerprints: Sequence[Sequence[int]],
        hexes: list[str],
        marks: list[str],
        bounds: str,
    ) -> list[FingerprintMatch]:
        """The table split by hash value over ``fingerprint_shards`` slots: one script per
        shard a request touches, all in one pipeline (one round trip per node, the nodes
        in parallel); each shard reports every earlier query sharing a hash with each
        fingerprint, and the shares are added up here."""
        shards = self.fingerprint_shards
        bases = self._shard_bases(table)
        ids = [os.urandom(8).hex() for _ in fingerprints]  # one query's id in every shard
        calls: dict[int, list[Any]] = {}  # shard -> ARGV
        order: dict[int, list[int]] = {}  # shard -> the fingerprints it was given, in order
        for i, hashes in enumerate(fingerprints):
            parts: dict[int, list[str]] = {}
            text = hexes[i]
            for k, h in enumerate(hashes):
                parts.setdefault(h % shards, []).append(text[16 * k : 16 * k + 16])
            for shard, mine in (parts or {0: []}).items():  # no hashes: shard 0 keeps its digest
                if shard not in calls:
                    calls[shard] = [client, bounds + " 1"]
                    order[shard] = []
                calls[shard].extend((marks[i], ids[i], "".join(mine)))
                order[shard].append(i)
        sha = self._fingerprints.sha

        def command(shard: int) -> list[Any]:
            return [sha, 1, f"{bases[shard]}:idx", *calls[shard]]

        async def run() -> dict[int, Any]:
            replies = await self._send_grouped({s: command(s) for s in calls})
            missing = [s for s, r in replies.items() if isinstance(r, NoScriptError)]
            if missing:  # a node that restarted forgot the script: load it, run those again
                await self._redis.script_load(_FINGERPRINTS)
                replies.update(await self._send_grouped({s: command(s) for s in missing}))
            for reply in replies.values():
                if isinstance(reply, Exception):
                    raise reply
            return replies

        # The shards' nodes back off together: every lookup of the table needs them all.
        where = f"table {table}" if self.cluster else ""
        replies = await self._run("fingerprints", run, "", node=where)
        shared: list[dict[str, list[int]]] = [{} for _ in fingerprints]
        repeat = [False] * len(fingerprints)
        for shard, rows in replies.items():
            for i, (repeated, found) in zip(order[shard], rows, strict=True):
                repeat[i] = repeat[i] or bool(repeated)
                words = bytes(found).split()
                for j in range(0, len(words), 3):
                    seen = shared[i].setdefault(words[j].decode(), [0, int(words[j + 2])])
                    seen[0] += int(words[j + 1])
        threshold = int(bounds.split()[0])
        out = []
        for i in range(len(fingerprints)):
            if repeat[i]:
                out.append(FingerprintMatch(0, 0, 0, repeat=True))
                continue
            over = [flags for n, flags in shared[i].values() if n > threshold]
            best = max((n for n, _ in shared[i].values()), default=0)
            out.append(FingerprintMatch(sum(f > 0 for f in over), over.count(3), best))
        return out

    async def _send_grouped(self, commands: dict[int, list[Any]]) -> dict[int, Any]:
        """Run ``EVALSHA`` commands (each on one slot): one plain pipeline per node, the
        nodes at once; a reply is the result or the error. On a cluster, a shard whose
        slot moved (``MOVED``, ``ASK``: the script did not run) is sent again through the
        cluster client, which follows the redirect and learns the new slot map. (The
        cluster client's own pipelines resolve each command's slot in a thread of its own:
        milliseconds a request.)"""
        if not self.cluster:
            return await _pipeline(self._redis, commands)
        await self._redis.initialize()  # the slot map: loaded once, then a no-op
        groups: dict[str, dict[int, list[Any]]] = {}
        clients: dict[str, aioredis.Redis] = {}
        for shard, args in commands.items():
            node = self._redis.get_node_from_key(args[2])
            client = self._node_clients.get(node.name)
            if client is None:
                pool = aioredis.ConnectionPool(
                    connection_class=node.connection_class,
                    **(node.connection_kwargs | {"max_connections": self.max_connections}),
                )
                client = self._node_clients[node.name] = aioredis.Redis(connection_pool=pool)
            clients[node.name] = client
            groups.setdefault(node.name, {})[shard] = args
        replies: dict[int, Any] = {}
        names = list(groups)
        parts = await asyncio.gather(
            *(_pipeline(clients[name], groups[name]) for name in names), return_exceptions=True
        )
        for name, part in zip(names, parts, strict=True):
            if isinstance(part, BaseException):
                if isinstance(part, (RedisConnectionError, RedisTimeoutError, OSError)):
                    await self._notice_down(name)
                raise part
            replies.update(part)
        for shard, reply in replies.items():
            if isinstance(reply, AskError):
                try:
                    replies[shard] = await self._redis.evalsha(*commands[shard])
                except RedisError as exc:
                    replies[shard] = exc
        return replies

    async def _notice_down(self, name: str) -> None:
        """Let the cluster client see that node ``name`` failed (our plain pipelines go
        around it): a command to the node through it fails the same way and makes it
        read the slot map again, so that a replica promoted meanwhile is found."""
        node = self._redis.get_node(node_name=name)
        if node is not None:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await self._redis.execute_command("PING", target_nodes=node)

    def _shard_bases(self, table: str) -> list[str]:
        """The key base of each shard of ``table``: its hash tag is picked so that shard
        ``s`` of ``S`` hashes into the middle of the ``s``-th ``S``-th of the slot range,
        which spreads the shards evenly over the nodes of a cluster whose nodes hold
        (about) equal slot ranges, as ``redis-cli --cluster create`` makes them."""
        bases = self._bases.get(table)
        if bases is None:
            shards = self.fingerprint_shards
            bases = []
            for shard in range(shards):
                low, high = shard * _SLOTS // shards, (shard + 1) * _SLOTS // shards
                low, high = low + (high - low) // 4, high - (high - low) // 4  # its middle half
                for attempt in itertools.count():
                    base = self._key(hash_tag(f"{table}#{shard}.{attempt}"))
                    if low <= key_slot(base.encode()) < high:
                        break
                bases.append(base)
            self._bases[table] = bases
        return bases

    async def close(self) -> None:
        await self._redis.aclose()
        for client in self._node_clients.values():
            await client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    # -- byte logs --------------------------------------------------------------------
    async def append_bytes(self, key: str, data: bytes, max_bytes: int, ttl_s: float) -> int:
        script = self._append_bytes
        keys = [self._key(key)]
        args: list[bytes | int] = [data, max_bytes, _ms(ttl_s)]
        return int(await self._run("append_bytes", lambda: script(keys=keys, args=args), keys[0]))

    async def read_bytes(self, key: str) -> bytes:
        full = self._key(key)
        value = await self._run("read_bytes", lambda: self._redis.get(full), full)
        return b"" if value is None else bytes(value)

    async def append_log(
        self, key: str, data: bytes, max_bytes: int, ttl_s: float, since: int | None
    ) -> tuple[int, bytes]:
        script = self._append_log
        full = self._key(key)
        keys = [full, full + ":end"]  # the same hash tag: one slot
        start = random.getrandbits(LOG_START_BITS)
        args = [data, max_bytes, _ms(ttl_s), -1 if since is None else since, start]
        end, tail = await self._run("append_log", lambda: script(keys=keys, args=args), full)
        return int(end), bytes(tail)


# An offset log: KEYS[1] its bytes, KEYS[2] the offset past them (absent: a new log, which
# starts at ARGV[5]); ARGV data, max bytes, ttl (ms), since (-1: all). As _APPEND_BYTES, then
# returns {end, the kept bytes from offset since (or all)}. One atomic step.
_APPEND_LOG = """
local n = redis.call('APPEND', KEYS[1], ARGV[1])
local stored = redis.call('GET', KEYS[2])
local fin
if stored and redis.call('PTTL', KEYS[1]) >= 0 and n > #ARGV[1] then
  fin = tonumber(stored) + #ARGV[1]
else
  n = #ARGV[1]
  redis.call('SET', KEYS[1], ARGV[1])
  fin = tonumber(ARGV[5]) + n
end
local cap = tonumber(ARGV[2])
if n > cap + math.floor(cap / 4) then
  redis.call('SET', KEYS[1], redis.call('GETRANGE', KEYS[1], n - cap, -1))
  n = cap
end
redis.call('SET', KEYS[2], string.format('%.0f', fin), 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local start = fin - n
local since = tonumber(ARGV[4])
if since < start or since > fin then since = start end
if since == fin then return {string.format('%.0f', fin), ''} end
return {string.format('%.0f', fin), redis.call('GETRANGE', KEYS[1], since - start, -1)}
"""


# APPEND; past a quarter more than ARGV[2] bytes, trim the front to ARGV[2] (a trim copies
# the value: amortized over many appends); renew the expiry. One atomic step.
_APPEND_BYTES = """
local n = redis.call('APPEND', KEYS[1], ARGV[1])
local cap = tonumber(ARGV[2])
if n > cap + math.floor(cap / 4) then
  redis.call('SET', KEYS[1], redis.call('GETRANGE', KEYS[1], n - cap, -1))
  n = cap
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return n
"""


def _hex(hashes: Sequence[int]) -> str:
    """``hashes`` as the fingerprint script reads them: 16 hex digits each, most significant
    first, one string (one C-level pass instead of a format call per hash)."""
    packed = array("Q", hashes)
    if sys.byteorder == "little":
        packed.byteswap()
    return packed.tobytes().hex()
