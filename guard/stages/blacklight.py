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

Keys: :class:`BlacklightOptions` (docs/stage-options.md).

Finding: ``score`` the client's matching earlier queries, ``threshold``
``matches``; the message also gives the matches of all clients. Technique
AML.T0043 (craft adversarial data). Failure mode: as ``on_error`` says (default
closed: 503 when the state store is down).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from guard.defenses.blacklight import Fingerprinter, FingerprintKey
from guard.pipeline import RequestContext, Verdict, take_prepared
from guard.stages import scale
from guard.stages.detector import Enforcement, MisdirectOptions, input_rows
from guard.stages.env import StageEnv
from guard.stages.options import Duration, OptionError, OptionsStage, option
from guard.state import StateStore, together

TECHNIQUE = "AML.T0043"  # Craft Adversarial Data (black-box evasion probes)
MAX_PER_HASH = 256  # postings kept per hash: a hash common to many queries says little


@functools.cache
def process_secret() -> bytes:
    """The key of a guard without ``key_env``: one per process, so it survives reloads (and
    the workers forked after their master drew it share it)."""
    return os.urandom(32)


@dataclass(frozen=True, kw_only=True)
class BlacklightOptions(MisdirectOptions):
    quantize: float = option(
        scale.QUANTIZE,
        gt=0,
        derive=scale.quantize,
        shown="`0.1875 x (max - min)` of the declared range, else `3.0`",
        doc="quantization step, in the input's units (the paper: 50 on 0-255; 3.0 on the "
        "digits demo's 0-16). The declared range: the validate stage's min/max, else a "
        "built-in model's (docs/input-scale.md)",
    )
    window: int = option(
        scale.WINDOW,
        min=1,
        derive=scale.window,
        shown="`min(20, size // 3)` of a row's values, else `20`",
        doc="values per hashed window (the paper: 20); a window longer than the row "
        "hashes it whole",
    )
    stride: int = option(1, min=1, doc="step between windows")
    top: int = option(50, min=1, max=4096, doc="hashes kept per fingerprint")
    threshold: int = option(
        min=0,
        derive=scale.threshold,
        shown="`top // 2`; half the row's windows where it has no more",
        doc="an earlier query *matches* when it shares more than this many hashes (< top)",
    )
    matches: int = option(
        3,
        min=1,
        doc="flag when at least this many earlier, non-identical queries of the same client match",
    )
    max_queries: int = option(10_000, min=1, max=10_000_000, doc="queries remembered per model")
    max_per_client: int = option(
        1000, min=1, max=10_000_000, doc="queries remembered per client (its share)"
    )
    ttl: Duration = option(Duration(3600.0), doc="how long a query is remembered")
    key_env: str | None = option(
        None,
        doc="environment variable holding the secret the hash key is derived from; required "
        "with a shared (Redis) state, so every replica hashes alike. Without it the key is "
        "random per process (the workers of one `guard serve --workers N` share their "
        "master's)",
    )

    REMOVED: ClassVar[dict[str, str]] = {
        "global_matches": "was removed: other clients' queries are no longer evidence (popular "
        "inputs and priming made honest clients refused); delete it, docs/detection.md",
    }

    def __post_init__(self) -> None:
        if self.threshold >= self.top:
            raise OptionError("threshold", f"must be <= {self.top - 1}; got {self.threshold}")


class Blacklight(OptionsStage[BlacklightOptions]):
    name = "blacklight"
    Options = BlacklightOptions

    def __init__(self, options: BlacklightOptions, env: StageEnv) -> None:
        super().__init__(options, env)
        self.enforcement = Enforcement.of(options, env, stage=self.name, technique=TECHNIQUE)
        self.fingerprinter = Fingerprinter(
            key=FingerprintKey.derive(_secret(options, env, store=self.enforcement.store)),
            step=options.quantize,
            window=options.window,
            stride=options.stride,
            top=options.top,
        )
        self.table = f"blacklight:{env.model}"

    def describe(self) -> dict[str, Any]:
        key_env = self.options.key_env
        return {
            **super().describe(),
            "key": f"from ${key_env}" if key_env else "random per process",
            "technique": TECHNIQUE,
        }

    async def prepare_request(self, ctx: RequestContext) -> None:
        o = self.options
        rows = input_rows(ctx, o.input)
        store = self.enforcement.store
        marks = self.enforcement.honour_marks(ctx, rows, o.input)
        matched = store.match_fingerprints(
            self.table,
            ctx.client.name,
            self.fingerprinter(rows),
            digests=self.fingerprinter.digests(rows),
            threshold=o.threshold,
            max_queries=o.max_queries,
            max_per_client=o.max_per_client,
            ttl_s=o.ttl,
            max_per_hash=MAX_PER_HASH,
        )
        _, ctx.stage_state[self.name] = await together(store, marks, matched)

    async def on_request(self, ctx: RequestContext) -> Verdict:
        results = await take_prepared(self, "prepare_request", ctx)
        if results is None:  # the store failed and on_error is open: served, flagged
            return Verdict.CONTINUE
        o = self.options
        rows = input_rows(ctx, o.input)
        fresh = [r for r in results if not r.repeat]
        if not fresh:
            return Verdict.CONTINUE
        found = max(fresh, key=lambda r: (r.client_matches, r.matches))
        if found.client_matches < o.matches:
            return Verdict.CONTINUE
        return await self.enforcement.report(
            ctx,
            f"query matches {found.client_matches} recent queries of this client and "
            f"{found.matches} of all clients (up to {found.best} of {self.fingerprinter.top} "
            "fingerprint hashes shared)",
            score=float(found.client_matches),
            threshold=float(o.matches),
            rows=rows,
            input_name=o.input,
        )


def _secret(options: BlacklightOptions, env: StageEnv, *, store: StateStore) -> bytes:
    """The hash key's secret: from ``key_env``, else one per process (never with state shared
    by other processes, unless they are this master's workers: they inherit its secret)."""
    if options.key_env is not None:
        secret = env.secret(options.key_env)
        if secret is None:
            raise OptionError(
                "key_env", f"names environment variable {options.key_env}, which is not set"
            )
        return secret.encode()
    if store.shared and not store.same_master:
        raise OptionError(
            None, "needs key_env with a shared state store: every replica must hash with one key"
        )
    return process_secret()
