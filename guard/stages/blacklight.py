"""``blacklight``: catch query-based attacks by their near-duplicate queries.

Each query (each row of a batch) is fingerprinted (:mod:`guard.defenses.blacklight`)
and compared with the recent queries of every client of the model. Evidence is
per client: a query counts against its client only by the earlier queries *of
that client* it matches. Three rules keep honest traffic free (docs/detection.md
has the measurements behind them):

* **Exact repeats are free.** A keyed digest of the row's exact bytes is kept
  beside its fingerprint; a row identical to one still in the table (sent by
  anyone) is neither compared, nor counted, nor inserted. Its answer is the
  same as before (the model is deterministic, privacy noise is keyed on the
  input), so it tells the sender nothing new.
* **Popular inputs are not evidence.** Matches against other clients' queries
  are reported (the finding's message, the audit log) but never decide: a
  client sending a jittered copy of an input many others sent, or of an input
  that accounts primed the table with, is not flagged for it. An attacker
  spread over many keys still sends many near-duplicates *per key* around one
  image, and each key is caught by its own.
* **Shares.** Each client keeps at most ``max_per_client`` queries in the table
  (its own oldest go first); a full table evicts from the client holding the
  most. One client's junk cannot flush another client's history.

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
``matches``      flag when at least this many earlier, non-identical queries *of
                 the same client* match; default 3
``max_queries``  queries remembered per model; default 10000
``max_per_client``  queries remembered per client (its share); default 1000
``ttl``          how long a query is remembered; default ``1h``
``key_env``      environment variable holding the secret the hash key is derived
                 from. Required with a shared (Redis) state, so every replica
                 hashes alike; without it the key is random per process
``action``       default ``deny``; ``misdirect``, ``degrade_for``, ``on_error``:
                 see :mod:`guard.stages.detector`

Finding: ``score`` the client's matching earlier queries, ``threshold``
``matches``; the message also gives the matches of all clients. Technique
AML.T0043 (craft adversarial data). Failure mode: as ``on_error`` says (default
closed: 503 when the state store is down).
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
        max_queries: int,
        max_per_client: int,
        ttl: float,
        keyed_by: str | None,
        enforcement: Enforcement,
        fail_open: bool,
    ) -> None:
        self.input_name = input_name
        self.fingerprinter = fingerprinter
        self.threshold = threshold
        self.matches = matches
        self.max_queries = max_queries
        self.max_per_client = max_per_client
        self.ttl = ttl
        self.keyed_by = keyed_by
        self.enforcement = enforcement
        self.fail_open = fail_open
        self.table = f"blacklight:{enforcement.model}"

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Blacklight:
        if section.has("global_matches"):
            raise section.error(
                "global_matches",
                "was removed: other clients' queries are no longer evidence (popular inputs "
                "and priming made honest clients refused); delete it, docs/detection.md",
            )
        enforcement = Enforcement.read(
            section, env, stage=cls.name, technique=TECHNIQUE, default=Action.DENY, misdirect=True
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
            matches=section.int("matches", 3, min=1),
            max_queries=section.int("max_queries", 10_000, min=1, max=10_000_000),
            max_per_client=section.int("max_per_client", 1000, min=1, max=10_000_000),
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
            "max_queries": self.max_queries,
            "max_per_client": self.max_per_client,
            "ttl": format_duration(self.ttl),
            "key": f"from ${self.keyed_by}" if self.keyed_by else "random per process",
            **self.enforcement.describe(),
        }

    async def on_request(self, ctx: RequestContext) -> Verdict:
        rows = input_rows(ctx, self.input_name)
        await self.enforcement.honour_marks(ctx, rows, self.input_name)
        results = await self.enforcement.store.match_fingerprints(
            self.table,
            ctx.client.name,
            self.fingerprinter(rows),
            digests=self.fingerprinter.digests(rows),
            threshold=self.threshold,
            max_queries=self.max_queries,
            max_per_client=self.max_per_client,
            ttl_s=self.ttl,
            max_per_hash=MAX_PER_HASH,
        )
        fresh = [r for r in results if not r.repeat]
        if not fresh:
            return Verdict.CONTINUE
        found = max(fresh, key=lambda r: (r.client_matches, r.matches))
        if found.client_matches < self.matches:
            return Verdict.CONTINUE
        return await self.enforcement.report(
            ctx,
            f"query matches {found.client_matches} recent queries of this client and "
            f"{found.matches} of all clients (up to {found.best} of {self.fingerprinter.top} "
            "fingerprint hashes shared)",
            score=float(found.client_matches),
            threshold=float(self.matches),
            rows=rows,
            input_name=self.input_name,
        )
