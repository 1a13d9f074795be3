"""Detection that holds on real traffic and against adaptive attackers, end to end.

    python tests/benchmarks/measure_adaptive.py [--samples 6] [--seed 0] [--policies none,default]
        [--attacks hopskipjump,square-linf,simba] [--modes single,sybil,oars] [--clients 40]

Every number is measured through a real guard on loopback (the digits model),
per policy: ``none`` (validate only: the baseline without detection), ``default``
(the digits stages of guard/policies/default.yaml, per-minute quotas raised so
only detection decides), or a YAML file of digits stages.

* **Honest mix** (``--clients`` keyed clients): popular inputs that many
  clients send (exact copies, and re-encoded ones), retries of the client's own
  last request (exact, and jittered), fresh held-out inputs with sensor noise.
  Reported: requests refused (non-200) or answered with a finding of any kind
  (degrade, misdirect, flag: read from the audit log), clients with any.
* **Priming**: 5 accounts send 20 inputs once each (exact or jittered), then
  honest clients send the same 20 (exact and jittered); reported as above.
* **Attacks** (HopSkipJump, Square L-inf, SimBA; ``--samples`` each) as one key
  (``single``), rotating over 10 keys (``sybil``), or OARS-style (``oars``): a
  fresh random transform per query (Gaussian noise), resampled with 1.5x more
  noise whenever the answer was refused or carried a degrade/deny verdict.
  *End-to-end success*: the attack reported success and the bare model (ONNX,
  no guard) misclassifies its adversarial example. Queries: rows sent, retries
  included.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

from guard.attacks import evasion
from guard.attacks.targets import HttpTarget, OnnxTarget, TargetSpec
from guard.models import load_samples
from tests.benchmarks.measure_detection import DEFAULT_POLICY, KEY_ENV, Guard

EARLY = 10  # a success within this many queries: before any detector can judge
EPS_L2 = 0.625 * 16
EPS_LINF = 0.125 * 16
ATTACKS = {
    "hopskipjump": lambda: evasion.HopSkipJump(epsilon=EPS_L2),
    "square-linf": lambda: evasion.SquareLinf(epsilon=EPS_LINF),
    "simba": lambda: evasion.SimBA(epsilon=EPS_LINF),
}
BUDGET = {"hopskipjump": 2000, "square-linf": 1000, "simba": 1000}


def digits_stages(path: Path = DEFAULT_POLICY) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text())
    stages = document["models"]["digits"]["stages"] if "models" in document else document
    for stage in stages:
        if "budget" in stage:  # quotas raised: only detection decides
            stage["budget"] = {"limits": [{"queries": 1_000_000, "per": "1m"}]}
    return stages


def write_policy(directory: Path, stages: list[dict[str, Any]], clients: list[str]) -> Path:
    from guard.clients import key_digest

    keys = {"clients": {name: {"key_sha256": key_digest(f"key-{name}")} for name in clients}}
    (directory / "keys.yaml").write_text(yaml.safe_dump(keys))
    for stage in stages:
        if "blacklight" in stage:
            stage["blacklight"].setdefault("key_env", KEY_ENV)
    document = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        "clients": {"keys_file": "keys.yaml"},
        "audit": {"path": str(directory / "audit.jsonl")},
    }
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def audited(directory: Path) -> list[dict[str, Any]]:
    path = directory / "audit.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_text().splitlines() if line]


class Client(HttpTarget):
    """One keyed client; ``keys`` > 1 rotates over several (a Sybil attacker)."""

    def __init__(self, url: str, names: list[str]) -> None:
        super().__init__(url, "digits", TargetSpec.builtin("digits"), api_key=f"key-{names[0]}")
        self.names = names
        self.sent = 0
        self.last: tuple[int, str | None] = (200, None)

    def _send(self, x: np.ndarray) -> Any:
        self.headers["X-API-Key"] = f"key-{self.names[self.sent % len(self.names)]}"
        self.headers["X-Request-Id"] = f"q{self.sent + 1}"  # the audit log says when it was caught
        self.sent += len(x)
        answers, status, verdict = super()._send(x)
        self.last = (status, verdict)
        return answers, status, verdict


class Oars(Client):
    """Fresh random noise on every query; more noise and a resample whenever refused
    or visibly degraded (at most ``tries`` sends per query)."""

    def __init__(self, url: str, names: list[str], rng: np.random.Generator) -> None:
        super().__init__(url, names)
        self.rng = rng
        self.sigma = 0.1
        self.tries = 6

    def _send(self, x: np.ndarray) -> Any:
        sigma = self.sigma
        for _ in range(self.tries):
            noisy = np.clip(x + self.rng.normal(0, sigma, x.shape), 0, 16).astype(np.float32)
            answers, status, verdict = super()._send(noisy)
            if status == 200 and verdict not in ("degrade", "deny"):
                return answers, status, verdict
            sigma *= 1.5
        return answers, status, verdict


# -- honest traffic ---------------------------------------------------------------------


def honest_mix(
    url: str, clients: int, per_client: int, rng: np.random.Generator, prefix: str = "honest"
) -> tuple[list[str], int]:
    """Send the honest mix; return the client names and the requests sent."""
    x, _ = load_samples("digits")
    popular = x[rng.choice(len(x), 20, replace=False)]
    fresh = iter(rng.permutation(len(x)).tolist() * 10)
    names = [f"{prefix}-{i}" for i in range(clients)]
    targets = [Client(url, [n]) for n in names]
    last: list[np.ndarray | None] = [None] * clients
    sent = 0
    order = np.repeat(np.arange(clients), per_client)
    rng.shuffle(order)
    for c in order:
        kind = rng.random()
        if kind < 0.35:  # a popular input: exact, or re-encoded (rounded, a little noise)
            row = popular[int(rng.integers(len(popular)))]
            if rng.random() < 0.5:
                row = np.clip(np.round(row + rng.normal(0, 0.3, 64)), 0, 16)
        elif kind < 0.55 and last[c] is not None:  # a retry of the last request
            row = last[c]
            if rng.random() < 0.5:
                row = np.clip(row + rng.normal(0, 0.2, 64), 0, 16)
        else:  # fresh input with sensor noise
            row = np.clip(x[next(fresh)] + rng.normal(0, 0.3, 64), 0, 16)
        targets[c].query(np.asarray(row, dtype=np.float32)[None])
        last[c] = row
        sent += 1
    for t in targets:
        t.close()
    return names, sent


def priming(url: str, rng: np.random.Generator) -> tuple[list[str], int]:
    x, _ = load_samples("digits")
    guessed = x[rng.choice(len(x), 20, replace=False)]
    for account in range(5):
        with Client(url, [f"primer-{account}"]) as primer:
            for row in guessed:
                jitter = rng.normal(0, 0.3, 64) if account % 2 else 0.0
                primer.query(np.clip(row + jitter, 0, 16).astype(np.float32)[None])
    names = [f"primed-{i}" for i in range(20)]
    sent = 0
    for name, row in zip(names, guessed, strict=True):
        with Client(url, [name]) as honest:
            for sent_row in (row, np.clip(row + rng.normal(0, 0.3, 64), 0, 16)):
                honest.query(np.asarray(sent_row, dtype=np.float32)[None])
                sent += 1
    return names, sent


def hit(records: list[dict[str, Any]], names: list[str]) -> tuple[int, int, int, str]:
    """(requests with a finding, clients with one, clients denied, per stage) among ``names``."""
    wanted = set(names)
    acted = [r for r in records if r["client"] in wanted and r["action"] != "allow"]
    requests = len({r["request_id"] for r in acted})
    clients = len({r["client"] for r in acted})
    denied = len({r["client"] for r in acted if r["action"] == "deny"})
    stages: dict[str, set[str]] = {}
    for r in acted:
        stages.setdefault(f"{r['stage']}/{r['action']}", set()).add(r["request_id"])
    per_stage = ", ".join(f"{k}: {len(v)}" for k, v in sorted(stages.items())) or "none"
    return requests, clients, denied, per_stage


# -- attacks ----------------------------------------------------------------------------


def attack_runs(
    guard: Guard, name: str, mode: str, samples: int, seed: int, bare: OnnxTarget, audit: Path
) -> dict[str, Any]:
    url = guard.url
    x, y = load_samples("digits")
    rows = np.random.default_rng([seed, 100]).choice(len(x), samples, replace=False)
    rng = np.random.default_rng([seed, list(ATTACKS).index(name)])
    keys = [f"attacker-{i}" for i in range(10 if mode == "sybil" else 1)]
    wins = reported = attacked = early = 0
    queries: list[int] = []
    firsts: list[int | None] = []
    for i in rows:
        # A fresh identity per sample: each sample is a new attack campaign.
        ids = [f"{k}-{i}" for k in keys]
        target = Oars(url, ids, rng) if mode == "oars" else Client(url, ids)
        with target:
            run = evasion.run_evasion(
                ATTACKS[name](), target, x[i : i + 1], y[i : i + 1], budget=BUDGET[name], rng=rng
            )
            sent = target.sent
        (sample,) = run.samples
        if not sample.attacked:
            continue
        attacked += 1
        queries.append(sent)
        guard.flush_audit()
        caught = [
            int(r["request_id"][1:])
            for r in audited(audit)
            if r["client"] in ids and r["action"] != "allow" and r["stage"] != "privacy"
        ]
        firsts.append(min(caught) if caught else None)
        if sample.success and sample.x_adv is not None:
            reported += 1
            label = bare.query(sample.x_adv[None].astype(np.float32)).labels[0]
            wins += int(label != y[i])
            early += int(label != y[i] and (sample.success_query or 0) <= EARLY)
    detected = [f for f in firsts if f is not None]
    return {
        "caught": f"{sum(1 for f in detected if f <= 100)}/{len(firsts)}",
        "first": f"{np.median(detected):.0f} / {max(detected)}" if detected else "-",
        "early": early,
        "attacked": attacked,
        "reported": reported,
        "success": wins / attacked if attacked else None,
        "queries": float(np.median(queries)) if queries else None,
    }


def identities(samples: int, seed: int) -> list[str]:
    x, _ = load_samples("digits")
    rows = np.random.default_rng([seed, 100]).choice(len(x), samples, replace=False)
    return [f"attacker-{k}-{i}" for k in range(10) for i in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="none,default")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--modes", default="single,sybil,oars")
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--skip-honest", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault(KEY_ENV, "measurement")
    names = [
        *(f"honest-{i}" for i in range(args.clients)),
        *(f"primer-{i}" for i in range(5)),
        *(f"primed-{i}" for i in range(20)),
        *identities(args.samples, args.seed),
    ]
    bare = OnnxTarget.builtin("digits")
    for label in args.policies.split(","):
        stages = (
            [{"validate": {"min": 0.0, "max": 16.0, "max_batch": 256}}]
            if label == "none"
            else digits_stages(DEFAULT_POLICY if label == "default" else Path(label))
        )
        print(f"\n### policy: {label}\n", flush=True)
        if not args.skip_honest:
            with tempfile.TemporaryDirectory() as tmp:
                path = write_policy(Path(tmp), copy.deepcopy(stages), names)
                started = time.perf_counter()
                with Guard(path) as guard:
                    rng = np.random.default_rng(args.seed)
                    honest, sent = honest_mix(guard.url, args.clients, args.per_client, rng)
                    primed, primed_sent = priming(guard.url, rng)
                records = audited(Path(tmp))
                r, c, d, by_stage = hit(records, honest)
                pr, _pc, _, pstages = hit(records, primed)
                print(
                    f"honest mix: {r}/{sent} requests with a finding ({r / sent:.2%}; {by_stage}), "
                    f"{c}/{len(honest)} clients, {d} denied; priming: {pr}/{primed_sent} honest "
                    f"requests with a finding ({pstages}); {time.perf_counter() - started:.0f} s",
                    flush=True,
                )
        print(
            "\n| attack | mode | attacked | reported success | end-to-end success | "
            f"of them within {EARLY} queries | median queries sent | caught within 100 | "
            "first finding median / max |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name in [a for a in args.attacks.split(",") if a]:
            for mode in args.modes.split(","):
                with tempfile.TemporaryDirectory() as tmp:
                    path = write_policy(Path(tmp), copy.deepcopy(stages), names)
                    with Guard(path) as guard:
                        result = attack_runs(
                            guard, name, mode, args.samples, args.seed, bare, Path(tmp)
                        )
                success = "-" if result["success"] is None else f"{result['success']:.2f}"
                print(
                    f"| {name} | {mode} | {result['attacked']} | {result['reported']} | "
                    f"{success} | {result['early']} | {result['queries']} | {result['caught']} | "
                    f"{result['first']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
