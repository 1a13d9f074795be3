"""Model extraction by natural data (Knockoff) and by synthetic data (JbDA) against the
``coverage`` and ``prada`` stages, among realistic honest traffic, through a real guard.

    python tests/benchmarks/measure_extraction.py [--runs 20] [--clients 40] [--queries 50]
        [--accounts 3] [--jbda-runs 5] [--heavy 200] [--heavy-runs 3] [--seed 0]

Each run starts a fresh guard on loopback (validate, ``coverage`` and ``prada``, both
with action ``flag`` so the attacks run unimpeded and their first detection is
measured; the audit log says which stage found which request) and sends, interleaved
in a random order with each stream's own order kept:

- the honest mix (:class:`guard.attacks.benign.TrafficMix`): ``--clients`` keyed clients
  of ``--queries`` requests each, every request one of: a popular input (20 held-out
  digits, Zipf 1.1), a retry of the client's previous request, a jittered copy
  (re-encoding, a one-pixel shift or sensor noise of 1 % of the range, of a popular or an
  own input) or a fresh input of the client's own share of the held-out digits
  (30 / 10 / 20 / 40 %);
- one Knockoff run of 1,000 queries from one key (the stream of
  :class:`guard.attacks.extraction.Knockoff`: half the held-out digits once in a random
  order, then augmented repeats), its surrogate trained on the answers;
- one Knockoff run of 1,000 queries rotating over ``--accounts`` keys (Sybil);

then, alone in a fresh guard, one JbDA run of 500 queries
(:class:`guard.attacks.extraction.JbDA`) for the first ``--jbda-runs`` runs. The first
``--padded-runs`` runs add two adaptive Knockoffs: one padding its stream with 40 % repeats
of its own queries (1,500 queries), one spread over ``--many-accounts`` keys. ``--heavy-runs`` more runs send only the honest mix with
``--heavy`` requests per client, plus one honest "batch" client that sends 300 distinct
held-out digits (all fresh: the case the detector cannot tell from an extractor).

Then, offline: the per-request cost of the two stages' ``on_response`` (in-process,
memory store, full histories), and the candidate rejected for this attack: a windowed
maximum mean discrepancy test against benign data, calibrated on benign-vs-benign
windows. Prints markdown tables (docs/extraction-detection.md). Seeded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guard.attacks.benign import TrafficMix  # noqa: E402
from guard.attacks.extraction import Evaluation, JbDA, augment  # noqa: E402
from guard.attacks.surrogate import Surrogate  # noqa: E402
from guard.attacks.targets import Answers, HttpTarget, OnnxTarget, TargetSpec  # noqa: E402
from guard.clients import key_digest  # noqa: E402
from guard.models import load_samples  # noqa: E402
from tests.benchmarks.measure_detection import Guard  # noqa: E402

SPEC = TargetSpec.builtin("digits")
KNOCKOFF_QUERIES = 1000
JBDA_QUERIES = 500
STAGES = ("coverage", "prada")


# -- traffic ------------------------------------------------------------------------------


def honest_mix(
    clients: int, queries: int, rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> dict[str, list[np.ndarray]]:
    """Per client of :class:`guard.attacks.benign.TrafficMix`, its requests in order."""
    planned = TrafficMix(queries=queries).plan(clients, rows, labels, SPEC, rng)
    out: dict[str, list[np.ndarray]] = {f"honest-{c}": [] for c in range(clients)}
    for request in planned:
        out[f"honest-{request.client}"].append(np.asarray(request.x, np.float32))
    return out


def knockoff_stream(pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The query stream of :class:`~guard.attacks.extraction.Knockoff` (it does not depend
    on the answers): the pool once in a random order, then augmented repeats."""
    n = KNOCKOFF_QUERIES
    order = np.concatenate([rng.permutation(len(pool)), rng.integers(0, len(pool), n)])[:n]
    x = np.asarray(pool, dtype=np.float64)[order]
    repeats = np.arange(n) >= len(pool)
    x[repeats] = augment(x[repeats], SPEC, rng, noise=0.05, shift=1, shape=(8, 8))
    return x.astype(np.float32)


def padded_stream(stream: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """An extractor that knows the detector: after every 3 new inputs, 2 exact repeats of its
    own recent ones (40 % padding keeps its novel fraction at 0.6, under ``min_fraction``)."""
    out: list[np.ndarray] = []
    fresh = iter(stream)
    while len(out) < n:
        if len(out) % 5 < 3:
            out.append(next(fresh))
        else:
            out.append(out[-1 - int(rng.integers(min(len(out), 10)))])
    return np.asarray(out, dtype=np.float32)


def interleave(
    streams: dict[str, list[tuple[str, np.ndarray]]], rng: np.random.Generator
) -> list[tuple[str, int, str, np.ndarray]]:
    """All requests as ``(stream, index in stream, client key name, row)`` in a random
    order that keeps each stream's own order."""
    names = list(streams)
    owners = rng.permutation(np.repeat(np.arange(len(names)), [len(streams[n]) for n in names]))
    sent = dict.fromkeys(names, 0)
    out = []
    for who in owners.tolist():
        name = names[who]
        client, row = streams[name][sent[name]]
        out.append((name, sent[name], client, row))
        sent[name] += 1
    return out


class Sender(HttpTarget):
    """One connection; each request names its client (API key) and its request id."""

    def __init__(self, url: str) -> None:
        super().__init__(url, "digits", SPEC)

    def send(self, client: str, request_id: str, x: np.ndarray) -> Answers:
        self.headers["X-API-Key"] = f"key-{client}"
        self.headers["X-Request-Id"] = request_id
        return self.query(np.atleast_2d(x))


class JbDATarget(Sender):
    """JbDA's oracle: one client, one request per row, numbered."""

    def __init__(self, url: str, client: str) -> None:
        super().__init__(url)
        self.client = client
        self.sent = 0

    def _send(self, x: np.ndarray) -> Any:
        self.headers["X-API-Key"] = f"key-{self.client}"
        self.headers["X-Request-Id"] = f"{self.client}/{self.sent}"
        self.sent += 1
        return super()._send(x)


# -- the guard ------------------------------------------------------------------------------


def write_policy(directory: Path, clients: Iterable[str], coverage: dict[str, Any]) -> Path:
    keys = {"clients": {c: {"key_sha256": key_digest(f"key-{c}")} for c in clients}}
    (directory / "keys.yaml").write_text(yaml.safe_dump(keys))
    stages = [
        {"validate": {"min": 0.0, "max": 16.0}},
        {"coverage": {"reference": "builtin:digits", "action": "flag", **coverage}},
        {"prada": {"action": "flag"}},
    ]
    document = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        "clients": {"keys_file": "keys.yaml"},
        "audit": {"path": "audit.jsonl"},
    }
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def first_findings(audit: Path) -> dict[tuple[str, str], int]:
    """``(stream, stage) -> index`` of the stream's first request the stage found."""
    firsts: dict[tuple[str, str], int] = {}
    if not audit.exists():
        return firsts
    for line in audit.read_text().splitlines():
        record = orjson.loads(line)
        stream, _, index = str(record["request_id"]).rpartition("/")
        key = (stream, record["stage"])
        firsts[key] = min(firsts.get(key, int(index)), int(index))
    return firsts


def fidelity(
    x: np.ndarray, scores: np.ndarray, answered: np.ndarray, held: np.ndarray, seed: int
) -> float:
    """The stolen copy's agreement with the victim on the held-out digits it never sent."""
    x_all, y_all = load_samples("digits")
    evaluation = Evaluation.of(OnnxTarget.builtin("digits"), x_all[held], y_all[held])
    surrogate = Surrogate(SPEC.n_features, SPEC.n_classes, hidden=128)
    surrogate.fit(x[answered], scores[answered], rng=np.random.default_rng(seed), steps=1500)
    return evaluation.score(surrogate)[0]


def attack_run(seed: int, args: argparse.Namespace, coverage: dict[str, Any]) -> dict[str, Any]:
    """One run: the honest mix with a Knockoff and a Sybil Knockoff, then JbDA."""
    rng = np.random.default_rng([args.seed, seed])
    x, y = load_samples("digits")
    honest = honest_mix(args.clients, args.queries, x, y, rng)
    streams: dict[str, list[tuple[str, np.ndarray]]] = {
        name: [(name, q) for q in queries] for name, queries in honest.items()
    }
    knock_pool, knock_held = np.split(rng.permutation(len(x)), [len(x) // 2])
    knock = knockoff_stream(x[knock_pool], rng)
    streams["knockoff"] = [("knockoff", q) for q in knock]
    sybil = knockoff_stream(x[rng.permutation(len(x))[: len(x) // 2]], rng)
    accounts = [f"sybil-{a}" for a in range(args.accounts)]
    streams["sybil"] = [(accounts[i % len(accounts)], q) for i, q in enumerate(sybil)]
    many = [f"many-{a}" for a in range(args.many_accounts)]
    if seed < args.padded_runs:
        padded = padded_stream(knockoff_stream(x, rng), rng, 1500)
        streams["padded"] = [("padded", q) for q in padded]
        spread = knockoff_stream(x[rng.permutation(len(x))[: len(x) // 2]], rng)
        streams["many"] = [(many[i % len(many)], q) for i, q in enumerate(spread)]
    clients = [*honest, "knockoff", *accounts, "padded", *many]
    scores = np.zeros((KNOCKOFF_QUERIES, SPEC.n_classes))
    answered = np.zeros(KNOCKOFF_QUERIES, bool)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_policy(Path(tmp), clients, coverage)
        with Guard(path) as guard:
            sender = Sender(guard.url)
            for stream, index, client, row in interleave(streams, rng):
                answer = sender.send(client, f"{stream}/{index}", row)
                if stream == "knockoff":
                    scores[index], answered[index] = answer.scores[0], answer.answered[0]
            sender.close()
        firsts = first_findings(Path(tmp) / "audit.jsonl")
    jbda_fidelity = None
    if seed < args.jbda_runs:  # alone in a fresh guard: no other attacker to pool it with
        pool, held = np.split(rng.permutation(len(x)), [len(x) // 2])
        evaluation = Evaluation.of(OnnxTarget.builtin("digits"), x[held], y[held])
        with tempfile.TemporaryDirectory() as tmp:
            path = write_policy(Path(tmp), ["jbda"], coverage)
            with Guard(path) as guard, JbDATarget(guard.url, "jbda") as target:
                run = JbDA(budget=JBDA_QUERIES, seed_size=50).run(target, x[pool], evaluation, rng)
            firsts.update(first_findings(Path(tmp) / "audit.jsonl"))
        jbda_fidelity = run.curve[-1].fidelity
    return {
        "firsts": firsts,
        "honest": list(honest),
        "knockoff_fidelity": fidelity(knock, scores, answered, knock_held, seed),
        "jbda": seed < args.jbda_runs,
        "padded": seed < args.padded_runs,
        "jbda_fidelity": jbda_fidelity,
    }


def heavy_run(seed: int, args: argparse.Namespace, coverage: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng([args.seed, 1000 + seed])
    x, y = load_samples("digits")
    honest = honest_mix(args.clients, args.heavy, x, y, rng)
    streams = {name: [(name, q) for q in queries] for name, queries in honest.items()}
    streams["batch"] = [("batch", q) for q in x[rng.permutation(len(x))[:300]]]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_policy(Path(tmp), [*honest, "batch"], coverage)
        with Guard(path) as guard:
            sender = Sender(guard.url)
            for stream, index, client, row in interleave(streams, rng):
                sender.send(client, f"{stream}/{index}", row)
            sender.close()
        firsts = first_findings(Path(tmp) / "audit.jsonl")
    return {"firsts": firsts, "honest": list(honest)}


def reaction_run(seed: int, action: str, args: argparse.Namespace) -> float:
    """A Knockoff run of 1,000 queries from one key against coverage with ``action``; the
    stolen copy's fidelity on the held-out digits it never sent."""
    from guard.attacks.extraction import Knockoff

    rng = np.random.default_rng([args.seed, 2000 + seed])
    x, y = load_samples("digits")
    pool, held = np.split(rng.permutation(len(x)), [len(x) // 2])
    evaluation = Evaluation.of(OnnxTarget.builtin("digits"), x[held], y[held])
    with tempfile.TemporaryDirectory() as tmp:
        path = write_policy(Path(tmp), ["knockoff"], {"action": action})
        with Guard(path) as guard, JbDATarget(guard.url, "knockoff") as target:
            run = Knockoff(budgets=(KNOCKOFF_QUERIES,)).run(target, x[pool], evaluation, rng)
    return run.curve[-1].fidelity


# -- offline: cost and the rejected candidate ----------------------------------------------


def stage_cost(requests: int = 1500, redis_url: str | None = None) -> dict[str, float]:
    """Microseconds per request of each stage's ``on_response`` (window / histories full),
    on the memory store, or on Redis at ``redis_url``."""
    from guard.backends.onnx import OnnxBackend
    from guard.clients import Client
    from guard.configreader import Section
    from guard.inference import InferRequest, InferResponse
    from guard.models import model_path
    from guard.pipeline import RequestContext
    from guard.stages import STAGES
    from guard.stages.env import StageEnv
    from guard.state.memory import MemoryStore

    onnx = OnnxBackend(model_path("digits"), name="digits", device="cpu")
    x, _ = load_samples("digits")
    rng = np.random.default_rng(0)
    rows = np.clip(x[rng.integers(0, len(x), requests)] + rng.normal(0, 1, (requests, 64)), 0, 16)
    rows = rows.astype(np.float32)
    answers = onnx.run({"input": rows})
    options = {"coverage": {"reference": "builtin:digits"}, "prada": {}}

    async def measure(name: str) -> float:
        from guard.state.redis import RedisStore

        store = (
            MemoryStore()
            if redis_url is None
            else RedisStore(redis_url, key_prefix=f"cost-{name}:", timeout=2.0)
        )
        env = StageEnv(
            model="digits",
            backend=None,
            local=None,
            metadata=onnx.model_metadata,
            state=store,
        )
        stage = STAGES[name](Section(options[name], source="m", path=name), env)
        took = []
        for i in range(requests):
            request = InferRequest(model_name="digits", inputs={"input": rows[i : i + 1]})
            ctx = RequestContext(
                request_id="r", model="digits", client=Client("c"), request=request
            )
            ctx.response = InferResponse(
                model_name="digits", outputs={k: v[i : i + 1] for k, v in answers.items()}
            )
            started = time.perf_counter()
            await stage.on_response(ctx)
            took.append(time.perf_counter() - started)
        await store.close()
        return float(np.median(took[-500:]) * 1e6)

    return {name: asyncio.run(measure(name)) for name in STAGES_FOR_COST}


def redis_cost() -> dict[str, float] | None:
    """:func:`stage_cost` on a redis-server of its own; None when none is installed."""
    import shutil

    from tests.integration.redis_server import RedisServer

    executable = shutil.which("redis-server")
    if executable is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(executable, Path(tmp))
        server.start()
        try:
            return stage_cost(redis_url=server.url)
        finally:
            server.stop()


STAGES_FOR_COST = ("coverage", "prada")


def mmd2(a: np.ndarray, b: np.ndarray, gamma: float) -> float:
    """Unbiased MMD² with the Gaussian kernel ``exp(-gamma ||u - v||²)`` (Gretton et al., JMLR
    2012)."""

    def k(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d2 = np.sum(u * u, 1)[:, None] + np.sum(v * v, 1)[None, :] - 2.0 * u @ v.T
        return np.exp(-gamma * np.maximum(d2, 0.0))

    m, n = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    return float(
        (kaa.sum() - np.trace(kaa)) / (m * (m - 1))
        + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
        - 2.0 * k(a, b).mean()
    )


def mmd_candidate(args: argparse.Namespace, window: int = 50) -> dict[str, float]:
    """A window of ``window`` queries against a benign reference (half the held-out digits):
    threshold the 99.5th percentile of benign-vs-benign windows (windows of the other half);
    the fraction of Knockoff windows (its first ``window`` queries) and of honest clients'
    windows (their first ``window`` requests) above it."""
    x, y = load_samples("digits")
    rng = np.random.default_rng([args.seed, 99])
    x = x.astype(np.float64)
    order = rng.permutation(len(x))
    reference, other = x[order[: len(x) // 2]], x[order[len(x) // 2 :]]
    other_labels = y[order[len(x) // 2 :]]
    sample = reference[rng.choice(len(reference), 200, replace=False)]
    d2 = np.sum((sample[:, None] - sample[None]) ** 2, -1)
    gamma = 1.0 / np.median(d2[d2 > 0])  # the median heuristic
    null = [
        mmd2(other[rng.choice(len(other), window, replace=False)], reference, gamma)
        for _ in range(400)
    ]
    threshold = float(np.quantile(null, 0.995))
    knock = [
        mmd2(
            knockoff_stream(other, np.random.default_rng([args.seed, 50, r]))[:window].astype(
                np.float64
            ),
            reference,
            gamma,
        )
        for r in range(40)
    ]
    honest = honest_mix(40, window, other, other_labels, np.random.default_rng([args.seed, 51]))
    fps = [mmd2(np.asarray(q, np.float64), reference, gamma) for q in honest.values()]
    return {
        "threshold": threshold,
        "knockoff": float(np.mean(np.asarray(knock) > threshold)),
        "honest": float(np.mean(np.asarray(fps) > threshold)),
    }


# -- report ---------------------------------------------------------------------------------


def caught(firsts: dict[tuple[str, str], int], stream: str, stages: Iterable[str]) -> int | None:
    found = [firsts[(stream, s)] + 1 for s in stages if (stream, s) in firsts]
    return min(found) if found else None


def describe(firsts: list[int | None], limit: int) -> str:
    hits = [f for f in firsts if f is not None and f <= limit]
    median = f"{np.median(hits):.0f}" if hits else "-"
    largest = f"{max(hits)}" if hits else "-"
    return f"{len(hits)}/{len(firsts)} | {median} | {largest}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs with attackers")
    parser.add_argument("--clients", type=int, default=40, help="honest keyed clients")
    parser.add_argument("--queries", type=int, default=50, help="requests per honest client")
    parser.add_argument("--accounts", type=int, default=3, help="keys of the Sybil Knockoff")
    parser.add_argument("--jbda-runs", type=int, default=5)
    parser.add_argument(
        "--padded-runs", type=int, default=5, help="runs with a padded and a many-key Knockoff"
    )
    parser.add_argument("--many-accounts", type=int, default=25, help="keys of the many-key one")
    parser.add_argument("--reaction-runs", type=int, default=2, help="Knockoff runs per action")
    parser.add_argument("--heavy", type=int, default=200, help="requests per heavy client")
    parser.add_argument("--heavy-runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--coverage", default="{}", help="YAML mapping of coverage options to override"
    )
    args = parser.parse_args(argv)
    coverage = yaml.safe_load(args.coverage) or {}
    os.environ.setdefault("GUARD_MEASURE_BLACKLIGHT_KEY", "measurement")
    started = time.perf_counter()

    runs = [attack_run(r, args, coverage) for r in range(args.runs)]
    print(
        f"\n### Attacks among {args.clients} honest clients x {args.queries} requests, "
        f"{args.runs} runs (seed {args.seed})\n"
    )
    print("| attack | stage | caught | first (median) | (max) | fidelity |")
    print("|---|---|---:|---:|---:|---:|")
    knock_fid = np.mean([r["knockoff_fidelity"] for r in runs])
    jbda_runs = [r for r in runs if r["jbda"]]
    jbda_fid = np.mean([r["jbda_fidelity"] for r in jbda_runs]) if jbda_runs else float("nan")
    for attack, limit, subset, fid in (
        ("knockoff", KNOCKOFF_QUERIES, runs, knock_fid),
        ("sybil", KNOCKOFF_QUERIES, runs, knock_fid),
        ("jbda", JBDA_QUERIES, jbda_runs, jbda_fid),
    ):
        label = f"knockoff, {args.accounts} keys" if attack == "sybil" else attack
        for stages in (("coverage",), ("prada",), STAGES):
            firsts = [caught(r["firsts"], attack, stages) for r in subset]
            shown = "-" if attack == "sybil" or not subset else f"{fid:.2f}"
            print(f"| {label} | {' + '.join(stages)} | {describe(firsts, limit)} | {shown} |")
    padded = [caught(r["firsts"], "padded", ("coverage",)) for r in runs if r["padded"]]
    print(
        f"| knockoff padded 40 % with repeats (1,500 queries) | coverage | "
        f"{describe(padded, 1500)} | - |"
    )
    spread = [caught(r["firsts"], "many", ("coverage",)) for r in runs if r["padded"]]
    print(
        f"| knockoff, {args.many_accounts} keys (1,000 queries) | coverage | "
        f"{describe(spread, KNOCKOFF_QUERIES)} | - |"
    )
    print(
        "\n(fidelity: agreement of the stolen copy with the victim on held-out digits, "
        "answers unimpeded: action flag)"
    )

    heavy = [heavy_run(r, args, coverage) for r in range(args.heavy_runs)]
    print("\n### Honest clients flagged\n")
    print("| traffic | clients | coverage | prada | either |")
    print("|---|---:|---:|---:|---:|")
    for label, group in (
        (f"mix, {args.queries} requests each, attackers active", runs),
        (f"mix, {args.heavy} requests each", heavy),
    ):
        total = sum(len(r["honest"]) for r in group)
        if not total:
            continue
        counts = []
        for stages in (("coverage",), ("prada",), STAGES):
            flagged = sum(
                caught(r["firsts"], c, stages) is not None for r in group for c in r["honest"]
            )
            counts.append(f"{flagged} ({flagged / total:.2%})")
        print(f"| {label} | {total} | {' | '.join(counts)} |")
    batch = [caught(r["firsts"], "batch", ("coverage",)) for r in heavy]
    print(
        f"\nhonest batch client (300 distinct held-out digits): coverage flagged it in "
        f"{sum(b is not None for b in batch)}/{len(batch)} runs, at request "
        f"{', '.join(str(b) for b in batch)}"
    )

    if args.reaction_runs:
        print("\n### What the extractor gets: Knockoff, 1,000 queries, one key\n")
        print("| coverage action | fidelity of the stolen copy (mean) | runs |")
        print("|---|---:|---:|")
    for action in ("flag", "degrade", "deny") if args.reaction_runs else ():
        fids = [reaction_run(r, action, args) for r in range(args.reaction_runs)]
        print(f"| {action} | {np.mean(fids):.3f} | {len(fids)} |")

    cost = stage_cost()
    print(
        f"\ncost of on_response, median per request, memory store, full history: "
        f"coverage {cost['coverage']:.0f} µs, prada {cost['prada']:.0f} µs "
        f"(ratio {cost['coverage'] / cost['prada']:.2f})"
    )
    on_redis = redis_cost()
    if on_redis is not None:
        print(
            f"on Redis (loopback): coverage {on_redis['coverage']:.0f} µs, "
            f"prada {on_redis['prada']:.0f} µs (ratio {on_redis['coverage'] / on_redis['prada']:.2f})"
        )
    mmd = mmd_candidate(args)
    print(
        f"\nrejected candidate, MMD of 50-query windows against benign data (threshold "
        f"{mmd['threshold']:.4f}, 99.5th percentile of benign-vs-benign windows): Knockoff "
        f"windows above it {mmd['knockoff']:.0%}, honest clients' windows above it "
        f"{mmd['honest']:.0%}"
    )
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
