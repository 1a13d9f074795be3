"""Measure one candidate policy: a real guard on loopback, benign clients, attackers.

:func:`measure_policy` serves the candidate with :func:`guard.server.create_app`
on 127.0.0.1 (:class:`~guard.attacks.guarded.InProcessGuard`, in a thread of its
own: the clients are synchronous) and sends
it, each as its own API key, honest traffic (:class:`~guard.attacks.benign.TrafficMix`
over the benign rows: many keyed clients sending popular inputs, exact retries,
jittered copies and fresh inputs; after a few untimed warm-up requests so that no
candidate pays for the process's first calls), then certification requests when the
policy has a ``certify`` stage.

A benign request is a false positive when the guard recorded a finding on it (any
stage, any action: a silent ``misdirect`` answers 200 with an ``allow`` verdict but
still counts), or answered it with a detected verdict or a refusal status. Findings are
read per request id from the guard's audit log (:class:`~guard.attacks.guarded.AuditTrail`),
so what the client was told does not decide it. Each attack then runs against a fresh
guard of its own (what it got, when it was caught): an attacker is measured as if it
were the first.
No state carries over between candidates either.

To measure the policy and nothing else, the candidate is served as a copy that
differs from what ``guard tune`` writes only where measuring needs it
(:func:`evaluation_policy`, by :func:`dataclasses.replace`): only the tuned
model; clients identified by generated keys; state in memory;
verdict headers on; an audit log in a temporary folder of the measurement
(where findings are read back per request); no admin token; the blacklight hash key, the
privacy noise key and the certify noise seed derived from the seed, so one
seed measures one candidate the same way twice. Every candidate of a search
sees the same traffic (the same seed): differences between candidates are the
policy's, not the draw's.
"""

from __future__ import annotations

import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from guard.attacks.benign import TrafficMix
from guard.attacks.guarded import InProcessGuard
from guard.attacks.registry import ATTACK, TUNABLE
from guard.attacks.targets import Target
from guard.clients import Client, ClientDirectory, key_digest
from guard.config import ModelConfig, Policy
from guard.state import StateConfig
from guard.tuning.attackers import AttackOutcome, ObservedTarget, run_attack
from guard.tuning.workload import Interface, TuneData, Workload

STREAMS = ("benign", *TUNABLE, "certify")  # stream k: default_rng([seed, k])
BLACKLIGHT_ENV = "GUARD_TUNE_BLACKLIGHT_KEY"
PRIVACY_ENV = "GUARD_TUNE_PRIVACY_KEY"
CERTIFY_BATCH = 10
WARMUP_CLIENT = "warmup"
WARMUP_QUERIES = 20  # calibration rows sent before the benign clients, and not timed


def stream(seed: int, name: str) -> np.random.Generator:
    """The random stream of one part of a measurement."""
    return np.random.default_rng([seed, STREAMS.index(name)])


@dataclass(frozen=True, slots=True)
class BenignOutcome:
    queries: int
    false_positives: int  # queries with a finding, a detected verdict or a refusal
    refused: int  # queries left unanswered (or answered by a stand-in for a deny)
    accuracy: float  # served labels against the truth (a refused query is wrong)
    accuracy_loss: float  # the bare model's accuracy on the same inputs, minus ``accuracy``
    score_change: float  # mean L1, served vs the bare model's probabilities (answered rows)
    stage_ms: dict[str, float]  # mean milliseconds per request spent in each stage
    round_trip_ms: float  # median client round trip, HTTP included

    @property
    def fp_rate(self) -> float:
        return self.false_positives / self.queries if self.queries else 0.0

    @property
    def added_ms(self) -> float:
        """Mean time per request in the policy's stages (the model and HTTP excluded)."""
        return sum(self.stage_ms.values())


@dataclass(frozen=True, slots=True)
class CertifiedOutcome:
    inputs: int
    accuracy: float  # certified label right (abstentions are wrong)
    accuracy_loss: float  # the bare model's accuracy on the same inputs, minus ``accuracy``
    acr: float  # average certified radius: radius when right, else 0
    abstained: float
    ms_per_input: float


@dataclass(frozen=True, slots=True)
class Baseline:
    """What the same traffic gets from the bare model (no guard)."""

    benign_accuracy: float
    attacks: dict[str, AttackOutcome]


@dataclass(frozen=True, slots=True)
class Measurement:
    benign: BenignOutcome
    attacks: tuple[AttackOutcome, ...]
    certified: CertifiedOutcome | None
    seconds: float

    def attack(self, name: str) -> AttackOutcome:
        return next(a for a in self.attacks if a.attack == name)


def evaluation_policy(
    policy: Policy,
    config: ModelConfig,
    *,
    clients: Sequence[str],
    seed: int,
    audit: Path | None = None,
) -> Policy:
    """The copy of a candidate (``config``, typed options) that is served while it is
    measured (see the module); ``clients`` are identified by their :func:`_key`; findings
    go to the audit log ``audit`` (none when None)."""
    fixed: dict[str, dict[str, Any]] = {
        "blacklight": {"key_env": BLACKLIGHT_ENV},
        "privacy": {"secret_env": PRIVACY_ENV},
        "certify": {"seed": seed},
    }
    stages = tuple(
        replace(e, options=replace(e.options, **fixed[e.kind])) if e.kind in fixed else e
        for e in config.stages
    )
    return replace(
        policy,
        models={config.name: replace(config, stages=stages)},
        clients=ClientDirectory(keys={key_digest(_key(c, seed)): Client(c) for c in clients}),
        state=StateConfig(),
        disclose=replace(policy.disclose, headers=True),  # verdicts are measured
        audit_path=None if audit is None else str(audit),
        admin_token_sha256=None,
        # the hash and noise keys, fixed per seed: the same run twice, the same answers
        environ={
            **policy.environ,
            BLACKLIGHT_ENV: f"guard-tune-blacklight-{seed}",
            PRIVACY_ENV: f"guard-tune-privacy-{seed}",
        },
    )


def measure_policy(
    policy: Policy,
    config: ModelConfig,
    *,
    data: TuneData,
    workload: Workload,
    attacks: tuple[str, ...],
    baseline: Baseline,
    seed: int,
    interface: Interface | None = None,
) -> Measurement:
    """Serve ``policy`` with ``config`` (a candidate of its model, typed options) in
    place of the model's and measure it. Raises :class:`~guard.errors.PolicyError`
    when it does not load."""
    interface = interface or Interface()
    started = time.perf_counter()
    model = config.name
    clients = [f"benign-{i}" for i in range(workload.benign_clients)]
    clients += [WARMUP_CLIENT, *(f"attacker-{name}" for name in attacks)]
    reference = data.reference()
    served = evaluation_policy(policy, config, clients=clients, seed=seed)
    stages = [entry.kind for entry in config.stages]

    def target(guard: InProcessGuard, name: str, batch: int = 1) -> ObservedTarget:
        return ObservedTarget(
            guard.url,
            model,
            data.spec,
            api_key=_key(name, seed),
            batch_size=batch,
            input_name=interface.input,
            scores_output=interface.scores,
            label_output=interface.label,
            trace=name,  # request ids name the client: findings are read back per request
        )

    with (
        tempfile.TemporaryDirectory(prefix="guard-tune-") as folder,
        InProcessGuard(
            evaluation_policy(
                policy, config, clients=clients, seed=seed, audit=Path(folder) / "audit.jsonl"
            )
        ) as guard,
    ):
        benign = _benign(
            guard,
            lambda name: target(guard, name),
            clients,
            stages,
            model,
            data,
            workload,
            reference,
            baseline,
            seed,
        )
        certified = None
        if "certify" in stages:
            key = _key(clients[0], seed)
            certified = _certify(
                guard.url, model, key, data, workload, reference, seed, interface.input
            )
    outcomes = []
    for name in attacks:  # each against a fresh guard: no attacker inherits another's
        with (
            InProcessGuard(served) as guard,
            target(guard, f"attacker-{name}", ATTACK[name].tune_batch) as attacker,
        ):
            rng = stream(seed, name)
            outcomes.append(run_attack(name, attacker, reference, data, workload, rng))
    return Measurement(benign, tuple(outcomes), certified, time.perf_counter() - started)


def _key(client: str, seed: int) -> str:
    return f"gk-tune-{seed}-{client}"


def _benign(
    guard: InProcessGuard,
    target: Any,
    clients: list[str],
    stages: list[str],
    model: str,
    data: TuneData,
    workload: Workload,
    reference: Target,
    baseline: Baseline,
    seed: int,
) -> BenignOutcome:
    with target(WARMUP_CLIENT) as warm:  # first calls pay for lazy imports and caches
        warm.query(data.calibration[:WARMUP_QUERIES])
    before = _spent(guard, model, stages)
    names = [c for c in clients if c.startswith("benign-")]
    targets = [target(name) for name in names]
    try:
        run = honest_traffic(workload).run(
            list(zip(names, targets, strict=True)),
            data.benign_x,
            data.benign_y,
            stream(seed, "benign"),
        )
    finally:
        for t in targets:
            t.close()
    measured = run.measure(guard.audit())  # findings per request: silent actions count
    queries = measured["requests"]
    after = _spent(guard, model, stages)
    spent = {stage: after[stage] - before[stage] for stage in stages}
    inputs = np.concatenate([x for t in targets for x in t.inputs])
    served = np.concatenate([a.scores for t in targets for a in t.answers])
    answered = ~np.isnan(served).any(axis=1)
    truth = reference.query(inputs).scores
    change = np.abs(served[answered] - truth[answered]).sum(axis=1)
    return BenignOutcome(
        queries=queries,
        false_positives=measured["all"]["flagged"],
        refused=measured["all"]["refused"],
        accuracy=measured["accuracy"],
        accuracy_loss=baseline.benign_accuracy - measured["accuracy"],
        score_change=float(change.mean()) if len(change) else 0.0,
        stage_ms={stage: 1e3 * spent[stage] / queries for stage in stages},
        round_trip_ms=1e3 * float(np.median([s for t in targets for s in t.seconds])),
    )


def honest_traffic(workload: Workload) -> TrafficMix:
    """The benign clients of a measurement: the realistic mix, with the shares of
    ``guard attack``'s benign defaults, ``workload.benign_queries`` requests per client."""
    return TrafficMix(queries=workload.benign_queries)


def _spent(guard: InProcessGuard, model: str, stages: list[str]) -> dict[str, float]:
    """Total seconds each stage has spent so far (from the guard's own histogram)."""
    name = "guard_stage_duration_seconds_sum"
    return {stage: guard.metric(name, {"model": model, "stage": stage}) for stage in stages}


def measure_baseline(
    data: TuneData, workload: Workload, attacks: tuple[str, ...], seed: int
) -> Baseline:
    """The same benign traffic and attacks against the bare model (the subject's: its
    ONNX file in-process, else its server)."""
    clients = [(f"benign-{i}", data.reference()) for i in range(workload.benign_clients)]
    run = honest_traffic(workload).run(
        clients, data.benign_x, data.benign_y, stream(seed, "benign")
    )
    reference = data.reference()
    outcomes = {
        name: run_attack(name, data.reference(), reference, data, workload, stream(seed, name))
        for name in attacks
    }
    return Baseline(benign_accuracy=run.measure()["accuracy"], attacks=outcomes)


def _certify(
    url: str,
    model: str,
    key: str,
    data: TuneData,
    workload: Workload,
    reference: Target,
    seed: int,
    input_name: str,
) -> CertifiedOutcome:
    """Ask the guard for certificates on benign inputs (``certify: true``), in batches."""
    from guard.inference import InferRequest
    from guard.protocols import v2

    rows = stream(seed, "certify").permutation(len(data.benign_x))[: workload.certify_inputs]
    x, y = data.benign_x[rows].astype(np.float32), data.benign_y[rows]
    labels, radii = [], []
    started = time.perf_counter()
    shape = data.spec.input_shape
    for begin in range(0, len(x), CERTIFY_BATCH):
        batch = x[begin : begin + CERTIFY_BATCH]
        if shape is not None:  # flat rows, sent as the model takes them
            batch = batch.reshape(len(batch), *shape)
        body, headers = v2.encode_request(
            InferRequest(
                model_name=model, inputs={input_name: batch}, parameters={"certify": True}
            ),
            binary=False,
        )
        request = urllib.request.Request(
            f"{url}/v2/models/{model}/infer",
            data=body,
            headers={**headers, "Content-Type": "application/json", "X-API-Key": key},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                parameters = orjson.loads(reply.read()).get("parameters") or {}
        except urllib.error.HTTPError:  # refused (a detector, a budget): no certificate
            parameters = {}
        if not parameters.get("certified"):
            labels += [-1] * len(batch)
            radii += [0.0] * len(batch)
            continue
        labels += np.atleast_1d(parameters["certified_label"]).tolist()
        radii += np.atleast_1d(parameters["certified_radius"]).tolist()
    seconds = time.perf_counter() - started
    label, radius = np.asarray(labels), np.asarray(radii, dtype=np.float64)
    right = label == y
    bare = float(np.mean(reference.query(x).labels == y))
    return CertifiedOutcome(
        inputs=len(x),
        accuracy=float(right.mean()),
        accuracy_loss=bare - float(right.mean()),
        acr=float(np.where(right, radius, 0.0).mean()),
        abstained=float(np.mean(label < 0)),
        ms_per_input=1e3 * seconds / len(x),
    )
