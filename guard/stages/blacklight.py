"""``blacklight``: catch query-based attacks by their near-duplicate queries.

Each query (each row of a batch) is fingerprinted (:mod:`guard.defenses.blacklight`)
and compared with the recent queries of *every* client of the model. Two counts
decide: the earlier queries of the same client that match (an attack), and
those of any client (an attacker spreading its queries over many accounts, or
over several guard replicas sharing a Redis state). The action applies to the
client that sent the matching query.

YAML keys (all optional):

``input``        the input to watch; default: the model's only input
``quantize``     quantization step, in the input's units; about a fifth of the
                 input range (the paper: 50 on 0-255). Default ``3.0``, for the
                 digits demo's 0-16 pixels; use 0.2 for inputs in [0, 1]
``window``       values per hashed window; default 20
``stride``       step between windows; default 1
``top``          hashes kept per fingerprint; default 50
``threshold``    an earlier query *matches* when it shares more than this many
                 hashes; default ``top // 2`` (25)
``matches``      flag when at least this many earlier queries *of the same
                 client* match; default 2 (one identical retry is not an attack)
``global_matches``  flag when at least this many earlier queries of *any* client
                 match; default 5 (a popular input sent by a few users is not one)
``max_queries``  queries remembered per model; default 10000
``ttl``          how long a query is remembered; default ``1h``
``key_env``      environment variable holding the secret the hash key is derived
                 from. Required with a shared (Redis) state, so every replica
                 hashes alike; without it the key is random per process
``action``       default ``deny``; ``degrade_for``, ``on_error``: see :mod:`guard.stages.detector`

Finding: ``score`` the client's matching earlier queries against ``matches``,
or when only the global count is reached, all clients' against
``global_matches``; the message gives both. Technique AML.T0043 (craft
adversarial data). Failure mode: as
``on_error`` says (default closed: 503 when the state store is down).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from guard.configreader import Section
from guard.defenses.blacklight import Fingerprinter, FingerprintKey
from guard.pipeline import Action, BaseStage, RequestContext, Verdict
from guard.stages.detector import (
    Enforcement,
    format_duration,
    input_rows,
    read_duration,
    read_input,
)
from guard.stages.env import StageEnv, read_fail_open

TECHNIQUE = "AML.T0043"  # Craft Adversarial Data (black-box evasion probes)
MAX_PER_HASH = 256  # postings kept per hash: a hash common to many queries says little


@functools.cache
def _process_secret() -> bytes:
    """The key of a guard without ``key_env``: one per process, so it survives reloads."""
    return os.urandom(32)


class Blacklight(BaseStage):
    name = "blacklight"

    def __init__(
        self,
        *,
        input_name: str | None,
        fingerprinter: Fingerprinter,
        threshold: int,
        matches: int,
        global_matches: int,
        max_queries: int,
        ttl: float,
        keyed_by: str | None,
        enforcement: Enforcement,
        fail_open: bool,
    ) -> None:
        self.input_name = input_name
        self.fingerprinter = fingerprinter
        self.threshold = threshold
        self.matches = matches
        self.global_matches = global_matches
        self.max_queries = max_queries
        self.ttl = ttl
        self.keyed_by = keyed_by
        self.enforcement = enforcement
        self.fail_open = fail_open
        self.table = f"blacklight:{enforcement.model}"

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Blacklight:
        enforcement = Enforcement.read(
            section, env, stage=cls.name, technique=TECHNIQUE, default=Action.DENY
        )
        top = section.int("top", 50, min=1, max=4096)
        key_env = section.str("key_env", None)
        if key_env is not None:
            secret = os.environ.get(key_env)
            if not secret:
                raise section.error(
                    "key_env", f"names environment variable {key_env}, which is not set"
                )
            key = FingerprintKey.derive(secret.encode())
        elif enforcement.store.shared:
            raise section.error(
                None,
                "needs key_env with a shared state store: every replica must hash with one key",
            )
        else:
            key = FingerprintKey.derive(_process_secret())
        stage = cls(
            input_name=read_input(section, env),
            fingerprinter=Fingerprinter(
                key=key,
                step=section.float("quantize", 3.0, gt=0),
                window=section.int("window", 20, min=1),
                stride=section.int("stride", 1, min=1),
                top=top,
            ),
            threshold=section.int("threshold", top // 2, min=0, max=top - 1),
            matches=section.int("matches", 2, min=1),
            global_matches=section.int("global_matches", 5, min=1),
            max_queries=section.int("max_queries", 10_000, min=1, max=10_000_000),
            ttl=read_duration(section, "ttl", 3600.0),
            keyed_by=key_env,
            enforcement=enforcement,
            fail_open=read_fail_open(section),
        )
        section.finish()
        return stage

    def describe(self) -> dict[str, Any]:
        f = self.fingerprinter
        return {
            "input": self.input_name,
            "quantize": f.step,
            "window": f.window,
            "stride": f.stride,
            "top": f.top,
            "threshold": self.threshold,
            "matches": self.matches,
            "global_matches": self.global_matches,
            "max_queries": self.max_queries,
            "ttl": format_duration(self.ttl),
            "key": f"from ${self.keyed_by}" if self.keyed_by else "random per process",
            **self.enforcement.describe(),
        }

    async def on_request(self, ctx: RequestContext) -> Verdict:
        await self.enforcement.honour_marks(ctx)
        fingerprints = self.fingerprinter(input_rows(ctx, self.input_name))
        results = await self.enforcement.store.match_fingerprints(
            self.table,
            ctx.client.name,
            fingerprints,
            threshold=self.threshold,
            max_queries=self.max_queries,
            ttl_s=self.ttl,
            max_per_hash=MAX_PER_HASH,
        )
        if not results:
            return Verdict.CONTINUE
        own = max(results, key=lambda r: r.client_matches)
        if own.client_matches >= self.matches:
            found, score, threshold = own, own.client_matches, self.matches
        else:
            found = max(results, key=lambda r: r.matches)
            if found.matches < self.global_matches:
                return Verdict.CONTINUE
            score, threshold = found.matches, self.global_matches
        return await self.enforcement.report(
            ctx,
            f"query matches {found.client_matches} recent queries of this client and "
            f"{found.matches} of all clients (up to {found.best} of {self.fingerprinter.top} "
            "fingerprint hashes shared)",
            score=float(score),
            threshold=float(threshold),
        )
