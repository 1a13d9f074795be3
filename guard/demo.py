"""``guard demo``: the built-in default policy, served and attacked for real.

It starts the guard on loopback with the three demo models embedded (digits,
breast_cancer and the 32x32 colour images of shapes) and the default policy,
plus two things the demo needs to tell its clients apart: a keys file generated
at start (the default policy identifies clients by address, and every client
here is 127.0.0.1) and an audit log. Then:

1. ordinary traffic in each protocol the guard speaks, and hostile input;
2. two users and three attackers at once, each with its own API key: an
   evasion attacker (Square L∞ on digits), an extraction attacker (Knockoff)
   and a membership-inference attacker, with a line as each is caught;
3. the same attacks against the bare model (in-process ONNX, no guard);
4. who was caught, when, by which stage, and what each got with and without
   the guard; the metrics, read from the operators' listener (a port of its own).

With ``--keep`` the guard keeps serving (the demo prints a user's key).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import yaml
from aiohttp import web

from guard.appkeys import LIVE
from guard.clients import key_digest, new_key
from guard.config import parse_policy
from guard.inference import InferRequest
from guard.models import load_samples, model_info
from guard.protocols import v2
from guard.server import create_app, create_ops_app, make_runner

DEFAULT_POLICY = Path(__file__).parent / "policies" / "default.yaml"
USERS = ("alice", "bob")
PRIVACY_ENV = "GUARD_DEMO_PRIVACY_KEY"  # the privacy stages' noise key, random per run
TOUR = "demo-app"  # the client of the protocol tour and the hostile input


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    correct: int = 0
    answered: int = 0

    def row(self, name: str) -> str:
        ok = self.statuses.get(200, 0)
        p50 = statistics.median(self.latencies) * 1e3 if self.latencies else float("nan")
        p99 = np.percentile(self.latencies, 99) * 1e3 if self.latencies else float("nan")
        accuracy = self.correct / self.answered if self.answered else float("nan")
        total = sum(self.statuses.values())
        return f"  {name:<22}{total:>8}{ok:>6}{p50:>9.2f}{p99:>9.2f}{accuracy:>10.3f}"


async def run_demo(*, port: int = 0, requests: int = 400, seed: int = 0, keep: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="guard-demo-") as tmp:
        folder = Path(tmp)
        keys = {name: new_key() for name in (*USERS, *ATTACKERS, TOUR)}
        entries = {name: {"key_sha256": key_digest(key)} for name, key in keys.items()}
        (folder / "keys.yaml").write_text(yaml.safe_dump({"clients": entries}))
        document = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
        document["clients"] = {"keys_file": str(folder / "keys.yaml")}
        document["audit"] = {"path": str(folder / "audit.jsonl")}
        for model in document["models"].values():
            for stage in model.get("stages") or []:
                if isinstance(stage, dict) and "privacy" in stage:
                    stage["privacy"].setdefault("secret_env", PRIVACY_ENV)
        environ = {PRIVACY_ENV: secrets.token_urlsafe(24), **os.environ}
        policy = parse_policy(
            document, source=str(DEFAULT_POLICY), base=DEFAULT_POLICY.parent, environ=environ
        )
        app = create_app(policy)
        runner = make_runner(app)
        ops = make_runner(create_ops_app(app))
        await runner.setup()
        await ops.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await web.TCPSite(ops, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        ops_base = f"http://127.0.0.1:{ops.addresses[0][1]}"
        print(f"inference-guard demo: digits, breast_cancer and shapes served embedded at {base}")
        print(f"metrics (operators only, a port of their own): {ops_base}/metrics")
        print(f"policy: {DEFAULT_POLICY} (mode {policy.mode})")
        print(f"  + a keys file for the demo's clients ({', '.join(keys)}),")
        print(f"    an audit log and a privacy noise key, generated in {folder}\n")
        rng = np.random.default_rng(seed)
        try:
            headers = {"X-API-Key": keys[TOUR]}
            async with aiohttp.ClientSession(base, headers=headers) as http:
                await _benign(http, requests, rng)
                await _hostile(http)
                rows = await _attacks(base, keys, seed)
                app[LIVE].current().audit.flush()  # written by a thread: wait for the last
                _table(rows, folder / "audit.jsonl")
            async with aiohttp.ClientSession(ops_base) as operator:
                await _metrics(operator)
            print(f"\nmetrics: {ops_base}/metrics (not on {base}: clients must not watch them)")
            if keep:
                digit = load_samples("digits")[0][0].astype(int).tolist()
                body = orjson.dumps(
                    {
                        "inputs": [
                            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": digit}
                        ]
                    }
                ).decode()
                print("serving until interrupted (Ctrl-C); as alice:")
                print(f"  curl -H 'X-API-Key: {keys['alice']}' {base}/v2/models/digits/infer \\")
                print(f"       -d '{body}'")
                await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await ops.cleanup()
    return 0


# -- 1. protocols and hostile input ------------------------------------------------------


async def _benign(http: aiohttp.ClientSession, requests: int, rng: np.random.Generator) -> None:
    senders: dict[str, Callable[..., Any]] = {
        "digits  v2 json": lambda x: _v2(http, "digits", x, binary=False),
        "digits  v2 binary": lambda x: _v2(http, "digits", x, binary=True),
        "breast_cancer  tf rows": lambda x: _tf(http, "breast_cancer", x),
        "breast_cancer  v2 json": lambda x: _v2(http, "breast_cancer", x, binary=False),
        "shapes  v2 binary": lambda x: _v2(http, "shapes", x, binary=True),
    }
    data = {name: load_samples(name) for name in ("digits", "breast_cancer", "shapes")}
    shapes = {"shapes": tuple(model_info("shapes")["input_shape"])}  # rows -> images
    # Each sample once before any repeats: a client re-sending the same digit is what
    # the default policy's blacklight stage refuses.
    streams = {
        name: iter(np.concatenate([rng.permutation(len(x)) for _ in range(8)]))
        for name, (x, _) in data.items()
    }
    tallies = {name: Tally() for name in senders}
    names = list(senders)
    print(
        f"1. ordinary traffic: {requests} requests, 4 concurrent, batches of 1-4 held-out samples"
    )

    async def worker(count: int) -> None:
        for _ in range(count):
            name = names[int(rng.integers(len(names)))]
            x_all, y_all = data[name.split()[0]]
            stream = streams[name.split()[0]]
            rows = np.array([next(stream) for _ in range(int(rng.integers(1, 5)))])
            started = time.perf_counter()
            x = x_all[rows]
            shape = shapes.get(name.split()[0])
            status, labels = await senders[name](x if shape is None else x.reshape(-1, *shape))
            tally = tallies[name]
            tally.latencies.append(time.perf_counter() - started)
            tally.statuses[status] += 1
            if labels is not None:
                tally.answered += len(rows)
                tally.correct += int(np.sum(np.asarray(labels) == y_all[rows]))

    await asyncio.gather(*(worker(requests // 4) for _ in range(4)))
    print(f"  {'route':<22}{'sent':>8}{'200':>6}{'p50 ms':>9}{'p99 ms':>9}{'accuracy':>10}")
    for name in names:
        print(tallies[name].row(name))


async def _v2(
    http: aiohttp.ClientSession, model: str, x: np.ndarray, *, binary: bool
) -> tuple[int, object]:
    request = InferRequest(
        model_name=model, inputs={"input": x.astype(np.float32)}, binary_outputs=binary
    )
    body, headers = v2.encode_request(request, binary=binary)
    async with http.post(f"/v2/models/{model}/infer", data=body, headers=headers) as reply:
        payload = await reply.read()
        if reply.status != 200:
            return reply.status, None
        length = reply.headers.get(v2.HEADER_LENGTH)
        response = v2.decode_response(payload, header_length=int(length) if length else None)
        return reply.status, response.outputs["label"]


async def _tf(http: aiohttp.ClientSession, model: str, x: np.ndarray) -> tuple[int, object]:
    body = orjson.dumps({"instances": x.tolist()})
    async with http.post(f"/v1/models/{model}:predict", data=body) as reply:
        payload = await reply.json(loads=orjson.loads)
        if reply.status != 200:
            return reply.status, None
        return reply.status, [p["label"] for p in payload["predictions"]]


def _v2_body(shape: list[int], datatype: str, data: list[Any]) -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}
    )


DIGITS = "/v2/models/digits/infer"
HOSTILE: list[tuple[str, str, bytes]] = [
    ("malformed JSON", DIGITS, b'{"inputs": [{"name": "input",'),
    ("wrong shape", DIGITS, _v2_body([1, 63], "FP32", [0.0] * 63)),
    ("wrong datatype", DIGITS, _v2_body([1, 64], "BYTES", ["x"] * 64)),
    (
        "NaN in input",
        DIGITS,
        b'{"inputs": [{"name": "input", "shape": [1, 64], '
        b'"datatype": "FP64", "data": [' + b"1.0, " * 10 + b"NaN" + b", 1.0" * 53 + b"]}]}",
    ),
    ("out of range", DIGITS, _v2_body([1, 64], "FP32", [0.0] * 63 + [255.0])),
    ("data/shape mismatch", DIGITS, _v2_body([1000000, 64], "FP32", [1.0])),
    ("oversized body", DIGITS, b" " * (9 << 20)),
    ("unknown model", "/v2/models/imagenet/infer", b"{}"),
    (
        "TF: ragged instances",
        "/v1/models/breast_cancer:predict",
        orjson.dumps({"instances": [[1.0] * 30, [1.0] * 29]}),
    ),
    ("no API key", DIGITS, _v2_body([1, 64], "FP32", [0.0] * 64)),
]


async def _hostile(http: aiohttp.ClientSession) -> None:
    print("\nhostile input: each refused in the protocol's error format, the guard stays up")
    for name, path, body in HOSTILE:
        headers = {"X-API-Key": ""} if name == "no API key" else None
        async with http.post(path, data=body, headers=headers) as reply:
            text = await reply.text()
            try:
                message = orjson.loads(text)["error"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                message = text
        print(f"  {name:<22}{reply.status:>5}  {message[:90]}")


# -- 2-4. attackers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attacker:
    client: str
    attack: str  # its name in guard.attacks.registry, run by guard.tuning.attackers.run_attack
    role: str
    plan: str  # what it does, for the opening line
    batch: int  # rows per request
    result: Callable[[Any], str]  # its outcome in words

    def run(self, target: Any, data: Any, workload: Any, rng: np.random.Generator) -> Any:
        from guard.attacks.targets import OnnxTarget
        from guard.tuning.attackers import run_attack

        reference = OnnxTarget.builtin("digits")  # judges extraction, uncounted
        return run_attack(self.attack, target, reference, data, workload, rng)


ATTACKERS = {
    a.client: a
    for a in (
        Attacker(
            "mallory-evasion",
            "square-linf",
            "evasion, Square L∞",
            "Square L∞ (ε 2 of 16) on 10 digits, up to 1000 queries each",
            1,
            lambda o: f"fooled the model on {round(o.success * o.units)}/{o.units} digits",
        ),
        Attacker(
            "mallory-extraction",
            "knockoff",
            "extraction, Knockoff",
            "Knockoff: 2000 queries from its own digits, batches of 20, then trains a copy",
            20,
            lambda o: f"a copy agreeing {o.success:.0%} with the model",
        ),
        Attacker(
            "mallory-membership",
            "membership",
            "membership inference",
            "loss and confidence thresholds on 898 records, label-only on 100 (51 queries each)",
            51,
            lambda o: f"advantage {o.success:.3f} (0: a coin flip)",
        ),
    )
}


def _workload() -> Any:
    from guard.tuning.workload import Workload

    return Workload(
        name="demo",
        benign_clients=len(USERS),
        benign_queries=150,
        evasion=("square-linf",),
        evasion_samples=10,
        evasion_budget=1000,
        knockoff_budgets=(250, 500, 1000, 2000),
        jbda_budget=0,
        membership=("threshold", "label-only"),
        membership_records=100,
        surrogate_steps=1000,
        certify_inputs=0,
        grid="small",
        passes=0,
    )


STAGE_NOTES = {
    "blacklight": "near-duplicate queries, as query-based attacks send (docs/detection.md)",
    "prada": "a query-distance distribution unlike natural data (docs/detection.md)",
    "coverage": "nearly only new inputs over every class, as natural-data extraction sends "
    "(docs/extraction-detection.md)",
    "budget": "over its query quota: 429 with Retry-After (docs/detection.md)",
    "privacy": "its privacy budget is spent: its answers now carry the label alone "
    "(docs/privacy.md)",
    "squeeze_detect": "predictions that move when the input is squeezed (docs/squeezing.md)",
}


@dataclass(frozen=True, slots=True)
class Row:
    client: str
    role: str
    queries: int
    caught: int | None
    guarded: str
    bare: str


async def _attacks(base: str, keys: dict[str, str], seed: int) -> list[Row]:
    from guard.attacks.benign import BenignTraffic
    from guard.attacks.targets import OnnxTarget, TargetSpec
    from guard.tuning.attackers import ObservedTarget
    from guard.tuning.workload import TuneData

    data, workload = TuneData.builtin("digits"), _workload()
    spec = TargetSpec.builtin("digits")
    say = _Clock()
    print("\n2. two users and three attackers at once, on digits, each with its own API key")

    def target(client: str, batch: int = 1) -> ObservedTarget:
        def caught(query: int, status: int, verdict: str | None) -> None:
            say(f"{client} caught at query {query}: {status} {verdict or ''}".rstrip())

        return ObservedTarget(
            base, "digits", spec, api_key=keys[client], batch_size=batch, on_caught=caught
        )

    def users() -> Any:
        say(f"{' and '.join(USERS)}: 150 held-out digits each, 25 a second")
        clients = [(name, target(name)) for name in USERS]
        run = BenignTraffic(queries=workload.benign_queries, rate=25.0).run(
            clients, data.benign_x, data.benign_y, np.random.default_rng([seed, 0])
        )
        say(f"{' and '.join(USERS)}: done")
        return run

    def attack(a: Attacker, index: int) -> tuple[Any, int]:
        say(f"{a.client}: {a.plan}")
        with target(a.client, a.batch) as t:
            outcome = a.run(t, data, workload, np.random.default_rng([seed, index]))
            answered = int(np.sum(np.asarray(t.log.status) == 200))
        say(f"{a.client}: done, {outcome.queries} queries, {answered} answered")
        return outcome, answered

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1 + len(ATTACKERS)) as pool:
        jobs = [loop.run_in_executor(pool, users)]
        jobs += [
            loop.run_in_executor(pool, attack, a, i) for i, a in enumerate(ATTACKERS.values(), 1)
        ]
        benign, *guarded = await asyncio.gather(*jobs)

        print("\n3. the same attacks and users against the bare model (no guard) ...")
        started = time.perf_counter()

        def bare() -> tuple[Any, list[Any]]:
            clients = [(name, OnnxTarget.builtin("digits")) for name in USERS]
            users_bare = BenignTraffic(queries=workload.benign_queries).run(
                clients, data.benign_x, data.benign_y, np.random.default_rng([seed, 0])
            )
            outcomes = [
                a.run(
                    OnnxTarget.builtin("digits"), data, workload, np.random.default_rng([seed, i])
                )
                for i, a in enumerate(ATTACKERS.values(), 1)
            ]
            return users_bare, outcomes

        benign_bare, unguarded = await loop.run_in_executor(pool, bare)
    print(f"  done in {time.perf_counter() - started:.1f} s")

    flagged = sum(c.detected for c in benign.clients)
    queries = sum(c.queries for c in benign.clients)
    rows = [
        Row(
            ", ".join(USERS),
            "users",
            queries,
            None,
            f"{flagged} flagged, accuracy {benign.summary()['accuracy']:.3f}",
            f"accuracy {benign_bare.summary()['accuracy']:.3f}",
        )
    ]
    for a, (outcome, _), bare_outcome in zip(ATTACKERS.values(), guarded, unguarded, strict=True):
        rows.append(
            Row(
                a.client,
                a.role,
                outcome.queries,
                outcome.first_caught,
                a.result(outcome),
                a.result(bare_outcome),
            )
        )
    return rows


class _Clock:
    """Progress lines stamped with the time since the attacks began; thread-safe."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(f"  [{time.perf_counter() - self.started:5.1f} s] {line}", flush=True)


def _table(rows: list[Row], audit: Path) -> None:
    first: dict[str, str] = {}
    stages: dict[str, str] = {}
    for line in audit.read_text().splitlines() if audit.exists() else []:
        record = orjson.loads(line)
        if record["client"] not in first:
            first[record["client"]] = f"{record['stage']} ({record['action']})"
            stages[record["client"]] = record["stage"]
    print("\n4. who was caught, and what each got")
    head = ("client", "role", "queries", "caught at", "by", "with the guard", "without")
    cells = [head] + [
        (
            r.client,
            r.role,
            str(r.queries),
            f"query {r.caught}" if r.caught else "-",
            first.get(r.client, "-") if r.caught else "-",
            r.guarded,
            r.bare,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
    caught_by = {stages[r.client] for r in rows if r.caught and r.client in stages}
    for stage in sorted(caught_by):
        print(f"  {stage}: {STAGE_NOTES.get(stage, 'see its documentation')}")


async def _metrics(http: aiohttp.ClientSession) -> None:
    async with http.get("/metrics") as reply:
        text = await reply.text()
    wanted = ("guard_findings_total{", "guard_requests_total{")
    lines = [line for line in text.splitlines() if line.startswith(wanted)]
    print("\nwhat the guard counted (guard_findings_total, guard_requests_total):")
    for line in sorted(lines):
        print(f"  {line}")
