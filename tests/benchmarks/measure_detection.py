"""Query-pattern detection on the digits model, measured through a real guard.

    python tests/benchmarks/measure_detection.py [--samples 10] [--seed 0]
        [--policy default|blacklight|prada|all] [--attacks hopskipjump,...] [--accounts 1]
        [--benign-clients 5] [--benign-queries 400]

For each policy (the digits stages of ``guard/policies/default.yaml``, or one
detector alone with action ``flag`` so the attack runs unimpeded and its first
detection is measured, not its reaction to refusals), each attack of the
project's suite (:mod:`guard.attacks`: HopSkipJump, Square L-inf and L2, SimBA,
Knockoff, JbDA) runs against a fresh guard (a fresh state) served on loopback in
a background thread, through :class:`~guard.attacks.targets.HttpTarget` as one
API client (with ``--accounts K``: a new one of K API keys for every request,
an attacker with many accounts). Benign clients (held-out digits, each client
its own share, replayed in random order with Gaussian noise of 2 % of the
range, one row per request, each its own API key) measure false positives.

Prints a markdown table per policy (used in docs/detection.md): per attack the
runs (samples attacked, or one extraction run), the fraction detected, the
median and largest query index of first detection within a run, runs shorter
than 10 queries (no detector can judge those), the attack's success rate and
the share of its queries refused. Everything is seeded; the numbers are the run's.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from guard.attacks import registry, suite
from guard.attacks.targets import HttpTarget, TargetSpec
from guard.clients import key_digest
from guard.config import load_policy
from guard.server import create_app, make_runner

ATTACKS = ("hopskipjump", "square-linf", "square-l2", "simba", "knockoff", "jbda")
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "guard" / "policies" / "default.yaml"
KEY_ENV = "GUARD_MEASURE_BLACKLIGHT_KEY"
SHORT_RUN = 10


def digits_stages() -> list[dict[str, Any]]:
    document = yaml.safe_load(DEFAULT_POLICY.read_text())
    return list(document["models"]["digits"]["stages"])


def policies() -> dict[str, list[dict[str, Any]]]:
    stages = digits_stages()
    validate = stages[0]
    alone = {}
    for name in ("blacklight", "prada"):
        options = next(copy.deepcopy(s[name]) for s in stages if name in s)
        options["action"] = "flag"
        alone[name] = [validate, {name: options}]
    return {"default": stages, **alone}


class Guard:
    """A guard on 127.0.0.1 in a thread of its own (the attack's client is synchronous)."""

    def __init__(self, policy_path: Path) -> None:
        self.policy_path = policy_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def __enter__(self) -> Guard:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    async def _start(self) -> None:
        app = create_app(load_policy(self.policy_path), registry=CollectorRegistry())
        self.runner = make_runner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    def flush_audit(self) -> None:
        """Wait until the audit log's writer thread has written every finding so far."""
        from guard.appkeys import LIVE

        if self.runner is not None:
            self.runner.app[LIVE].current().audit.flush()

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Attacker(HttpTarget):
    """The attacker's client: one API key, or a new one of ``accounts`` keys for every request."""

    def __init__(self, url: str, accounts: int) -> None:
        super().__init__(url, "digits", TargetSpec.builtin("digits"), api_key="key-attacker-0")
        self.keys = [f"key-attacker-{i}" for i in range(accounts)]
        self.sent = 0

    def _send(self, x: np.ndarray) -> Any:
        self.headers["X-API-Key"] = self.keys[self.sent % len(self.keys)]
        self.sent += 1
        return super()._send(x)


def write_policy(directory: Path, stages: list[dict[str, Any]], clients: list[str]) -> Path:
    keys = {"clients": {name: {"key_sha256": key_digest(f"key-{name}")} for name in clients}}
    (directory / "keys.yaml").write_text(yaml.safe_dump(keys))
    for stage in stages:
        if "blacklight" in stage:
            stage["blacklight"].setdefault("key_env", KEY_ENV)
    document = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        "clients": {"keys_file": "keys.yaml"},
    }
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def evasion_runs(
    name: str, policy_path: Path, config: suite.SuiteConfig, accounts: int
) -> dict[str, Any]:
    """One evasion attack: per sample, first detection and queries spent."""
    from guard.attacks import evasion
    from guard.models import load_samples

    spec = TargetSpec.builtin("digits")
    attack, _ = registry.ATTACK[name].evasion_attack(float(spec.hi - spec.lo))
    x, y = load_samples("digits")
    rows = np.random.default_rng([config.seed, 100]).choice(len(x), config.samples, replace=False)
    rng = np.random.default_rng([config.seed, registry.ATTACKS.index(name)])
    budget = registry.ATTACK[name].budget
    with (
        Guard(policy_path) as guard,
        Attacker(guard.url, accounts) as target,
    ):
        run = evasion.run_evasion(attack, target, x[rows], y[rows], budget=budget, rng=rng)
    attacked = run.attacked
    return {
        "runs": len(attacked),
        "firsts": [s.first_detection for s in attacked],
        "queries": [s.queries for s in attacked],
        "success": float(np.mean([s.success for s in attacked])) if attacked else None,
        "refused": sum(s.refused for s in attacked) / max(1, sum(s.queries for s in attacked)),
    }


def extraction_run(
    name: str, policy_path: Path, config: suite.SuiteConfig, accounts: int
) -> dict[str, Any]:
    with Guard(policy_path) as guard:

        def make_target(i: int | None) -> HttpTarget:
            return Attacker(guard.url, accounts)

        entry = suite.run_suite([name], config, make_target, target_label=guard.url).entries[0]
    first = entry["first_detection_query"]
    return {
        "runs": 1,
        "firsts": [None if first is None else int(first)],
        "queries": [int(entry["queries"])],
        "success": entry["success_rate"],  # fidelity of the stolen model
        "refused": entry["refused_fraction"],
    }


def benign_run(policy_path: Path, clients: int, queries: int, seed: int) -> dict[str, Any]:
    spec = TargetSpec.builtin("digits")
    config = suite.SuiteConfig(model="digits", seed=seed, budget=queries, benign_clients=clients)
    with Guard(policy_path) as guard:

        def make_target(i: int | None) -> HttpTarget:
            return HttpTarget(guard.url, "digits", spec, api_key=f"key-benign-{i}")

        entry = suite.run_suite(["benign"], config, make_target, target_label=guard.url).entries[0]
    return {
        "queries": entry["queries"],
        "flagged": round(entry["false_positive_rate"] * entry["queries"]),
        "accuracy": entry["accuracy"],
    }


def row(name: str, result: dict[str, Any]) -> str:
    firsts, queries = result["firsts"], result["queries"]
    detected = [f for f in firsts if f is not None]
    short = sum(1 for q, f in zip(queries, firsts, strict=True) if f is None and q < SHORT_RUN)
    median = f"{np.median(detected):.0f}" if detected else "-"
    largest = f"{max(detected)}" if detected else "-"
    success = "-" if result["success"] is None else f"{result['success']:.2f}"
    return (
        f"| {name} | {result['runs']} | {len(detected)}/{len(firsts)} | {median} | {largest} | "
        f"{short} | {success} | {result['refused']:.2f} |"
    )


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="evasion samples per attack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--policy", choices=["default", "blacklight", "prada", "all"], default="all"
    )
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--benign-clients", type=int, default=5)
    parser.add_argument("--benign-queries", type=int, default=400, help="per benign client")
    parser.add_argument(
        "--accounts",
        type=int,
        default=1,
        help="API keys the attacker rotates over, one per request",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault(KEY_ENV, "measurement")
    config = suite.SuiteConfig(model="digits", samples=args.samples, seed=args.seed)
    chosen = policies() if args.policy == "all" else {args.policy: policies()[args.policy]}
    attacks = [a for a in args.attacks.split(",") if a]
    clients = [
        *(f"attacker-{i}" for i in range(args.accounts)),
        *(f"benign-{i}" for i in range(args.benign_clients)),
    ]
    for label, stages in chosen.items():
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = write_policy(Path(tmp), copy.deepcopy(stages), clients)
            print(f"\n### policy: {label} ({', '.join(next(iter(s)) for s in stages)})\n")
            print(
                "| attack | runs | detected | first detection (median) | (max) | "
                f"undetected runs < {SHORT_RUN} queries | success | refused |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for name in attacks:
                measure = (
                    evasion_runs if registry.ATTACK[name].family == "evasion" else extraction_run
                )
                print(row(name, measure(name, path, config, args.accounts)), flush=True)
            benign = benign_run(path, args.benign_clients, args.benign_queries, args.seed)
            print(
                f"\nbenign: {benign['flagged']} of {benign['queries']} queries flagged "
                f"({args.benign_clients} clients, noise 2 % of the range); accuracy {benign['accuracy']:.3f}; "
                f"{time.perf_counter() - started:.0f} s"
            )


if __name__ == "__main__":
    main()
