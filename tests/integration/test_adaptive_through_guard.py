"""The honest mix and the adaptive attackers, through a real guard on loopback.

The guard runs in-process (:class:`~guard.attacks.guarded.InProcessGuard`, its own
thread and Prometheus registry) so the synchronous clients can be checked
against what the guard itself counted and audited.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from guard.attacks import adaptive
from guard.attacks.benign import TrafficMix, judge, priming_requests
from guard.attacks.evasion import SquareLinf, run_evasion
from guard.attacks.guarded import InProcessGuard, api_key, measurement_policy
from guard.attacks.targets import HttpTarget, OnnxTarget, TargetSpec
from guard.models import load_samples

SPEC = TargetSpec.builtin("digits")
REQUESTS = "guard_requests_total"


def policy_file(
    tmp_path: Path, stages: list[dict[str, Any]], clients: list[str], *, raise_quotas: bool = True
) -> Path:
    base = tmp_path / "base.yaml"
    document = {"version": 1, "models": {"digits": {"model": "builtin:digits", "stages": stages}}}
    base.write_text(yaml.safe_dump(document))
    folder = tmp_path / "run"
    folder.mkdir()
    return measurement_policy(folder, clients, base=base, raise_quotas=raise_quotas)


VALIDATE = {"validate": {"min": 0.0, "max": 16.0, "max_batch": 256}}
BLACKLIGHT_DENY = {
    "blacklight": {
        "quantize": 3.0,
        "window": 20,
        "top": 50,
        "threshold": 25,
        "matches": 2,
        "action": "deny",
    }
}


def clients_of(guard: InProcessGuard, names: list[str]) -> list[HttpTarget]:
    return [HttpTarget(guard.url, "digits", SPEC, api_key=api_key(n), trace=n) for n in names]


def test_the_benign_mix_sends_what_it_claims_through_the_guard(tmp_path: Path) -> None:
    x, y = load_samples("digits")
    names = [f"user-{i}" for i in range(8)]
    mix = TrafficMix(queries=30, popular=0.4, retry=0.2, jitter=0.2, pool=5)
    with InProcessGuard(policy_file(tmp_path, [VALIDATE], names)) as guard:
        made = clients_of(guard, names)
        run = mix.run(list(zip(names, made, strict=True)), x, y, np.random.default_rng(3))
        served = guard.metric(REQUESTS)
        for t in made:
            t.close()
    assert served == len(run.outcomes) == 8 * 30
    assert {o.status for o in run.outcomes} == {200}
    assert all(not judge(o, guard.audit()).flagged for o in run.outcomes)
    # popular inputs: several clients send the same one, byte for byte
    senders: dict[bytes, set[int]] = defaultdict(set)
    for r in run.planned:
        if r.category == "popular":
            senders[r.x.tobytes()].add(r.client)
    assert max(len(c) for c in senders.values()) >= 3
    # retries: the client's own previous request, exactly
    last: dict[int, np.ndarray] = {}
    retries = 0
    for r in run.planned:
        if r.category == "retry":
            assert np.array_equal(r.x, last[r.client])
            retries += 1
        last[r.client] = r.x
    assert retries >= 10
    # jitter: close to its source, never equal to it, every kind present
    popular_rows, _, _ = mix.popular_pool(x, y, np.random.default_rng(3))
    jittered = [r for r in run.planned if r.category == "jitter"]
    assert {r.jitter for r in jittered} == {"reencode", "shift", "noise"}
    for r in jittered:
        kind, index = r.source.split(":")
        source = x[popular_rows[int(index)]] if kind == "popular" else x[int(index)]
        assert not np.array_equal(r.x, source)
        if r.jitter != "shift":
            assert np.abs(r.x - source).max() < 0.1 * 16
    # fresh: each sent once, by one client
    fresh = [r.source for r in run.planned if r.category == "fresh"]
    assert len(fresh) == len(set(fresh)) > 20
    measured = run.measure(guard.audit())
    assert measured["clients"] == 8 and measured["clients_denied"] == 0
    assert measured["all"]["requests"] == 240


def test_priming_and_refusals_are_read_from_the_audit_log(tmp_path: Path) -> None:
    x, y = load_samples("digits")
    names = [f"user-{i}" for i in range(6)]
    primers = [f"primer-{a}" for a in range(3)]
    mix = TrafficMix(queries=20, popular=0.6, retry=0.1, jitter=0.1, pool=4)
    # a quota of 15 queries a day per client: the honest users' last 5 are refused (429),
    # whatever the detectors do with repeats
    quota = {"budget": {"limits": [{"queries": 15, "per": "1d"}]}}
    path = policy_file(tmp_path, [VALIDATE, quota], names + primers, raise_quotas=False)
    with InProcessGuard(path) as guard:
        made = clients_of(guard, names + primers)
        plans = priming_requests(
            mix,
            x,
            y,
            SPEC,
            np.random.default_rng(1),
            accounts=3,
            mix_rng=np.random.default_rng(2),
        )
        before = list(zip(zip(primers, made[6:], strict=True), plans, strict=True))
        run = mix.run(
            list(zip(names, made[:6], strict=True)), x, y, np.random.default_rng(2), before=before
        )
        audit = guard.audit()
        for t in made:
            t.close()
    assert len(run.priming) == 3 * 4 * 2
    assert {o.source for o in run.priming} == {f"popular:{k}" for k in range(4)}
    refused = [o for o in run.outcomes if o.status != 200]
    assert len(refused) == 6 * 5 and {o.status for o in refused} == {429}
    # every refusal the client saw is one the guard recorded, under the request's id
    assert all(any(f.refusing for f in audit.of_request(o.request_id)) for o in refused)
    measured = run.measure(audit)
    assert measured["all"]["refused"] == len(refused)
    assert measured["clients_denied"] == 6 and measured["clients"] == 6
    assert measured["primed_requests"] > 0


@pytest.mark.parametrize("kind", ["oars", "sybil", "flushing", "labelonly"])
def test_adaptive_attackers_query_through_the_guard(tmp_path: Path, kind: str) -> None:
    x, y = load_samples("digits")
    bare = OnnxTarget.builtin("digits")
    right = np.flatnonzero(bare.query(x[:20]).labels == y[:20])[:1]
    n = adaptive.accounts_needed(kind, sybil_keys=10, junk_keys=2)
    names = [f"{kind}-{i}" for i in range(n)]
    stages = [VALIDATE, BLACKLIGHT_DENY]
    if kind == "sybil":  # a key's every 10th Square query is too far for hashes to match
        stages.append({"provenance": {"distance": 8.0, "links": 2, "action": "deny"}})
    with InProcessGuard(policy_file(tmp_path, stages, names)) as guard:
        made = clients_of(guard, names)
        wrapped = adaptive.wrap(kind, made, np.random.default_rng(0), flush_every=20)
        if kind == "flushing":
            wrapped = adaptive.Flushing(
                made[0], made[1:], np.random.default_rng(0), every=20, junk=300, batch=100
            )
        run = run_evasion(
            SquareLinf(epsilon=2.0),
            wrapped,
            x[right],
            y[right],
            budget=60,
            rng=np.random.default_rng(0),
        )
        served_rows = sum(t.queries for t in made)
        served = guard.metric(REQUESTS)
        audit = guard.audit()
        for t in made:
            t.close()
    assert run.samples[0].queries == wrapped.queries <= 60
    assert adaptive.real_queries(wrapped) == served_rows
    requests = sum(t.requests for t in made)
    assert served == requests  # every request the attacker sent reached the guard
    if kind in ("oars", "labelonly"):
        # the guard refused some queries and the attacker resent them with more noise
        assert wrapped.resent > 0 and served_rows > wrapped.queries
    if kind == "sybil":
        assert all(t.queries >= 5 for t in made)
        assert len({f.client for f in audit.findings}) >= 2  # caught on several accounts
    if kind == "flushing":
        assert wrapped.flushes >= 2 and sum(t.queries for t in made[1:]) == 300 * wrapped.flushes
