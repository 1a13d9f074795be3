"""The Redis state store: one state for every guard replica.

Each operation is one round trip and atomic: a Lua script (counters, budgets,
fingerprints) or a MULTI pipeline (histories). Times come from Redis's own
clock where a script needs one (``TIME``), so replicas with skewed clocks agree.
Keys are ``<key_prefix><key>``; a client's keys carry its hash tag, a
fingerprint table's keys the table's, so every script touches one Cluster slot.

``cluster=True`` opens a :class:`redis.asyncio.cluster.RedisCluster` on the
URL's node: it learns the slot map from it, sends each command to the node of
its key's slot and follows ``MOVED``/``ASK`` as slots move. A single-node client
pointed at a Cluster node gets ``MOVED`` for most keys: the error then says to
set ``cluster: true``.

Any failure (refused, reset, timed out, an error reply) raises
:class:`~guard.errors.StateUnavailable` and is counted through ``on_error``.
After a connection failure the store answers :class:`StateUnavailable` at once
for ``backoff_s`` instead of making every request wait for a dead server, then
tries again: ``redis.asyncio`` reconnects on the next command. On a cluster the
backoff is per node (per slot until the slot map is known): a dead node's
clients wait it out, the other nodes' clients are served.

Lua numbers are doubles: counters and budgets are exact up to 2**53.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, ClusterDownError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from guard.errors import StateUnavailable
from guard.state.base import FingerprintMatch, hash_tag

__all__ = ["RedisStore"]

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

# KEYS: index (hash -> "qid qid ..."), queries (qid -> "ms hashes digest client"), meta (seq,
#       head), digests (digest -> qid), sizes (zset client -> queries held).
# ARGV: client, threshold, max_queries, ttl (ms), max_per_hash, expire_per_insert,
#       max_per_client, owner-list key prefix (client appended; same hash tag),
#       then per fingerprint: its digest ('-' for none), its number of hashes and the
#       hashes (16 hex digits each).
# Returns {matches, client_matches, best, repeat} per fingerprint. Mirrors MemoryStore.
_FINGERPRINTS = """
local idx, qs, meta, digs, sizes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local client = ARGV[1]
local threshold = tonumber(ARGV[2])
local max_queries = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local max_per_hash = tonumber(ARGV[5])
local expire_per_insert = tonumber(ARGV[6])
local share = tonumber(ARGV[7])
local owners = ARGV[8]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
local head = tonumber(redis.call('HGET', meta, 'head') or '1')
local held = redis.call('HLEN', qs)

local function evict(qid)
  local rec = redis.call('HGET', qs, qid)
  if not rec then return end
  redis.call('HDEL', qs, qid)
  held = held - 1
  local hashes, digest, who = string.match(rec, '^%d+ (%x*) (%S+) (.*)$')
  local sid = tostring(qid)
  for i = 1, #hashes, 16 do
    local h = string.sub(hashes, i, i + 15)
    local ids = redis.call('HGET', idx, h)
    if ids then
      local kept = {}
      for id in string.gmatch(ids, '%d+') do
        if id ~= sid then kept[#kept + 1] = id end
      end
      if #kept == 0 then redis.call('HDEL', idx, h)
      else redis.call('HSET', idx, h, table.concat(kept, ' ')) end
    end
  end
  if digest ~= '-' and redis.call('HGET', digs, digest) == sid then
    redis.call('HDEL', digs, digest)
  end
  redis.call('LREM', owners .. who, 1, sid)
  if tonumber(redis.call('ZINCRBY', sizes, -1, who)) <= 0 then
    redis.call('ZREM', sizes, who)
  end
end

local out = {}
local a = 9
while a <= #ARGV do
  local digest = ARGV[a]
  local k = tonumber(ARGV[a + 1])
  local first = a + 2
  a = a + k + 2
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
    out[#out + 1] = {0, 0, 0, 1}
  else
    local hashes = {}
    local shared = {}
    for i = first, first + k - 1 do
      local h = ARGV[i]
      hashes[#hashes + 1] = h
      local ids = redis.call('HGET', idx, h)
      if ids then
        for id in string.gmatch(ids, '%d+') do shared[id] = (shared[id] or 0) + 1 end
      end
    end
    local matches, own, best = 0, 0, 0
    for id, n in pairs(shared) do
      if n > best then best = n end
      if n > threshold then
        local rec = redis.call('HGET', qs, id)
        local at, who = string.match(rec, '^(%d+) %x* %S+ (.*)$')
        if tonumber(at) > now - ttl then
          matches = matches + 1
          if who == client then own = own + 1 end
        end
      end
    end
    seq = seq + 1
    local rec = now .. ' ' .. table.concat(hashes) .. ' ' .. digest .. ' ' .. client
    redis.call('HSET', qs, seq, rec)
    held = held + 1
    if digest ~= '-' then redis.call('HSET', digs, digest, seq) end
    for _, h in ipairs(hashes) do
      local ids = redis.call('HGET', idx, h)
      if ids then
        local _, count = string.gsub(ids, ' ', ' ')
        if count + 1 >= max_per_hash then ids = string.match(ids, '^%d+ (.*)$') or '' end
        if ids == '' then ids = tostring(seq) else ids = ids .. ' ' .. seq end
      else
        ids = tostring(seq)
      end
      redis.call('HSET', idx, h, ids)
    end
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
    out[#out + 1] = {matches, own, best, 0}
  end
end
redis.call('HSET', meta, 'seq', seq, 'head', head)
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
return out
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisStore:
    """:class:`~guard.state.base.StateStore` on a Redis server (``redis.asyncio``)."""

    backend = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "guard:",
        timeout: float = 0.2,
        backoff_s: float = 0.5,
        on_error: Callable[[str], None] | None = None,
        expire_per_insert: int = 8,
        cluster: bool = False,
    ) -> None:
        self.key_prefix = key_prefix
        self.backoff_s = backoff_s
        self.cluster = cluster
        self._on_error = on_error
        self._expire_per_insert = expire_per_insert
        self._down_until: dict[str, float] = {}  # per node ("" for a single server)
        # No retries: a request must not wait out backoffs; the next request reconnects.
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
        }
        self._redis: Any
        if cluster:
            # Slots of a dead node fail; the others are served (the server decides too:
            # cluster-require-full-coverage).
            self._redis = RedisCluster.from_url(url, require_full_coverage=False, **options)
        else:
            self._redis = aioredis.Redis.from_url(url, **options)
        self._incr = self._redis.register_script(_INCR)
        self._spend = self._redis.register_script(_SPEND)
        self._fingerprints = self._redis.register_script(_FINGERPRINTS)

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

    async def _run(self, op: str, call: Callable[[], Any], key: str) -> Any:
        """Await ``call()`` (commands on ``key``'s node), turning every Redis failure
        into StateUnavailable."""
        node = self._node(key)
        if time.monotonic() < self._down_until.get(node, 0.0):
            self._failed(op)
            raise StateUnavailable("state store unavailable (redis: reconnecting)")
        try:
            return await call()
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

        async def call() -> Any:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(full, *items)
                pipe.ltrim(full, -cap, -1)
                pipe.pexpire(full, _ms(ttl_s))
                return await pipe.execute()

        length, _, _ = await self._run("push", call, full)
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
        base = self._key(hash_tag(table))
        share = max_queries if max_per_client is None else min(max_per_client, max_queries)
        args: list[Any] = [
            client,
            threshold,
            max_queries,
            _ms(ttl_s),
            max_per_hash,
            self._expire_per_insert,
            share,
            f"{base}:o:",
        ]
        for i, hashes in enumerate(fingerprints):
            args.append("-" if digests is None else bytes(digests[i]).hex())
            args.append(len(hashes))
            args.extend(f"{h:016x}" for h in hashes)
        keys = [f"{base}:idx", f"{base}:q", f"{base}:meta", f"{base}:d", f"{base}:n"]
        rows = await self._run(
            "fingerprints", lambda: self._fingerprints(keys=keys, args=args), keys[0]
        )
        return [FingerprintMatch(int(m), int(c), int(b), bool(r)) for m, c, b, r in rows]

    async def close(self) -> None:
        await self._redis.aclose()

    # -- byte logs --------------------------------------------------------------------
    async def append_bytes(self, key: str, data: bytes, max_bytes: int, ttl_s: float) -> int:
        script = self._redis.register_script(_APPEND_BYTES)  # cheap: EVALSHA, loaded once
        keys = [self._key(key)]
        args: list[bytes | int] = [data, max_bytes, _ms(ttl_s)]
        return int(await self._run("append_bytes", lambda: script(keys=keys, args=args), keys[0]))

    async def read_bytes(self, key: str) -> bytes:
        full = self._key(key)
        value = await self._run("read_bytes", lambda: self._redis.get(full), full)
        return b"" if value is None else bytes(value)


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
