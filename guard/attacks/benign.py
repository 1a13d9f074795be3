"""Ordinary clients, to measure a defence's false positives and its cost to utility.

Each client replays its own share of the held-out inputs (the shares are
disjoint, so two clients never send the same image; a client repeats an image
only once its share is used up) in a random order, with natural variation
(Gaussian noise of ``noise`` times the input range; image shifts of up to
``shift`` pixels), one row per request. With ``rate`` set, each client's
requests arrive as a Poisson process of that many per second and the clients
interleave in time order; otherwise they interleave in a random order with no
pause. Give each client its own target (its own API key) so per-client
detectors see several clients.

Every query of a benign client that a detector flags is a false positive.

:class:`TrafficMix` is realistic honest traffic, what detectors must leave
alone: many keyed clients, each request one of

``popular``  one of a small pool of inputs that many clients send (a popular
             example, a common record), drawn Zipf-like: a few are very popular;
``retry``    an exact resend of the client's own previous request;
``jitter``   a small honest variation of a popular input or of the client's own
             earlier input: re-encoding (an 8-bit round trip after a brightness
             change of up to 3 %), a shift of one pixel (images), or sensor noise
             (Gaussian, ``noise`` times the range);
``fresh``    an input of the client's own share of the held-out rows, sent once
             (when the share runs out, a jittered copy of one of its own).

The clients' requests interleave in a random order (each client's own order
kept). :func:`priming_requests` is the denial-of-service set-up against
history-based detectors: accounts that send guessed inputs (exact and
jittered copies of the popular ones) before the honest users do. What
happened to each request is read from the guard's own record when there is one
(:class:`~guard.attacks.guarded.AuditTrail`), since a guard may answer a
detected client silently; otherwise from the status and verdict header.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from guard.attacks.detection import detection
from guard.attacks.evasion.square import Grid
from guard.attacks.extraction import augment
from guard.attacks.targets import DETECTED_STATUS, DETECTED_VERDICTS, Target, TargetSpec

if TYPE_CHECKING:
    from guard.attacks.guarded import AuditTrail

CATEGORIES = ("popular", "retry", "jitter", "fresh")
JITTERS = ("reencode", "shift", "noise")


@dataclass(frozen=True, slots=True)
class ClientResult:
    name: str
    queries: int
    detected: int
    refused: int
    correct: int  # answered with the true label


@dataclass(frozen=True, slots=True)
class BenignRun:
    attack: str
    params: dict[str, Any]
    clients: tuple[ClientResult, ...]
    seconds: float

    def summary(self, target: Target | None = None) -> dict[str, Any]:
        queries = sum(c.queries for c in self.clients)
        detected = sum(c.detected for c in self.clients)
        refused = sum(c.refused for c in self.clients)
        return {
            "attack": self.attack,
            "family": "benign",
            "unit": "query",
            "units": queries,
            "success_rate": None,
            "queries": queries,
            "detected_fraction": detected / queries if queries else None,
            "first_detection_query": None,
            "detected_query_fraction": detected / queries if queries else None,
            "refused_fraction": refused / queries if queries else None,
            "false_positive_rate": detected / queries if queries else None,
            "accuracy": sum(c.correct for c in self.clients) / queries if queries else None,
            "clients": [dataclasses.asdict(c) for c in self.clients],
            "params": self.params,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class BenignTraffic:
    queries: int = 200  # per client
    noise: float = 0.02  # Gaussian noise, fraction of the input range
    shift: int = 0  # image shifts of up to this many pixels (0: none)
    rate: float | None = None  # requests per second per client (Poisson); None: no pause
    name: ClassVar[str] = "benign"

    def run(
        self,
        clients: Sequence[tuple[str, Target]],
        x: np.ndarray,
        y: np.ndarray,
        rng: np.random.Generator,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> BenignRun:
        """Send ``queries`` rows per ``(name, target)`` client drawn from ``x`` (labels ``y``)."""
        if len({id(target) for _, target in clients}) != len(clients):
            raise ValueError("each benign client needs its own target")
        started = time.perf_counter()
        n = self.queries
        plans = []
        shares = np.array_split(rng.permutation(len(x)), len(clients))
        for (_, target), share in zip(clients, shares, strict=True):
            shape = Grid.of(target.spec) if self.shift else None
            cycles = -(-n // len(share))
            rows = np.concatenate([rng.permutation(share) for _ in range(cycles)])[:n]
            inputs = augment(
                x[rows], target.spec, rng, noise=self.noise, shift=self.shift, shape=shape
            )
            plans.append((target, inputs, y[rows], target.queries))
        if self.rate is None:
            order = rng.permutation(np.repeat(np.arange(len(clients)), n))
            times = np.zeros(len(order))
        else:
            arrivals = np.cumsum(rng.exponential(1.0 / self.rate, (len(clients), n)), axis=1)
            flat = np.argsort(arrivals.ravel(), kind="stable")
            order, times = flat // n, arrivals.ravel()[flat]
        sent = [0] * len(clients)
        clock = time.monotonic()
        correct = [0] * len(clients)
        for who, at in zip(order.tolist(), times.tolist(), strict=True):
            if self.rate is not None:
                sleep(max(0.0, clock + at - time.monotonic()))
            target, inputs, labels, _ = plans[who]
            i = sent[who]
            answers = target.query(inputs[i : i + 1])
            correct[who] += int(answers.labels[0] == labels[i])
            sent[who] += 1
        results = []
        for (name, target), (_, _, _, start), good in zip(clients, plans, correct, strict=True):
            found = detection(target.log, [(start, start + n)])
            results.append(
                ClientResult(name, n, found.detected_queries, found.refused_queries, good)
            )
        return BenignRun(
            self.name, dataclasses.asdict(self), tuple(results), time.perf_counter() - started
        )


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request of the mix: who sends what, and where the input came from."""

    client: int
    category: str  # one of CATEGORIES, or "priming"
    source: str  # the natural input behind it: "popular:3", "row:120"
    x: np.ndarray = dataclasses.field(repr=False)  # [F], float32 as sent
    label: int
    jitter: str | None = None  # one of JITTERS for a jittered input


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    client: str
    category: str
    source: str
    status: int
    verdict: str | None
    request_id: str | None
    correct: bool


def reencode(x: np.ndarray, spec: TargetSpec, rng: np.random.Generator) -> np.ndarray:
    """A re-encoded copy: brightness scaled by up to 3 %, then an 8-bit round trip."""
    lo, hi = spec.lo, spec.hi
    scaled = spec.clip(lo + (x - lo) * rng.uniform(0.97, 1.03))
    levels = np.round((scaled - lo) / (hi - lo) * 255.0)
    return spec.clip(lo + levels / 255.0 * (hi - lo))


@dataclass(frozen=True, kw_only=True, slots=True)
class TrafficMix:
    """Realistic honest traffic (see the module docstring); the fresh share is the rest."""

    queries: int = 50  # per client
    popular: float = 0.3
    retry: float = 0.1
    jitter: float = 0.2
    pool: int = 20  # popular inputs
    zipf: float = 1.1  # popularity of the k-th popular input ~ 1 / k^zipf
    noise: float = 0.01  # sensor noise, fraction of the input range
    name: ClassVar[str] = "benign"

    def __post_init__(self) -> None:
        shares = (self.popular, self.retry, self.jitter)
        if min(shares) < 0 or sum(shares) > 1 + 1e-9 or self.queries < 1 or self.pool < 1:
            raise ValueError(f"invalid traffic mix: {self}")

    @property
    def fresh(self) -> float:
        return max(0.0, 1.0 - self.popular - self.retry - self.jitter)

    def popular_pool(
        self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, weights, rest)``: the popular rows of ``x``, their Zipf weights, the
        other rows (the clients' fresh shares)."""
        order = rng.permutation(len(x))
        rows, rest = order[: self.pool], order[self.pool :]
        weights = 1.0 / np.arange(1, len(rows) + 1) ** self.zipf
        return rows, weights / weights.sum(), rest

    def plan(
        self,
        n_clients: int,
        x: np.ndarray,
        y: np.ndarray,
        spec: TargetSpec,
        rng: np.random.Generator,
    ) -> list[PlannedRequest]:
        """Every request of ``n_clients`` clients, in the order they are sent."""
        x = np.asarray(x, dtype=np.float64)
        rows, weights, rest = self.popular_pool(x, y, rng)
        shares = np.array_split(rng.permutation(rest), n_clients)
        shape = Grid.of(spec) if spec.scalar_range else None
        odds = np.array([self.popular, self.retry, self.jitter, self.fresh])
        odds /= odds.sum()
        per_client: list[list[PlannedRequest]] = []
        for c, share in enumerate(shares):
            mine: list[PlannedRequest] = []
            own: list[int] = []  # rows of the share already sent
            for category in rng.choice(CATEGORIES, size=self.queries, p=odds).tolist():
                if category == "retry" and mine:
                    last = mine[-1]
                    mine.append(dataclasses.replace(last, category="retry"))
                    continue
                if category == "popular":
                    k = int(rng.choice(len(rows), p=weights))
                    mine.append(
                        PlannedRequest(c, "popular", f"popular:{k}", x[rows[k]], int(y[rows[k]]))
                    )
                    continue
                if category in ("fresh", "retry") and len(own) < len(share):
                    row = int(share[len(own)])
                    own.append(row)
                    mine.append(PlannedRequest(c, "fresh", f"row:{row}", x[row], int(y[row])))
                    continue
                # jitter (or fresh with the share used up): vary a popular or an own input
                if own and rng.random() < 0.5:
                    row = int(own[rng.integers(len(own))])
                    source = f"row:{row}"
                else:
                    k = int(rng.choice(len(rows), p=weights))
                    row, source = int(rows[k]), f"popular:{k}"
                kinds = JITTERS if shape else ("reencode", "noise")
                kind = kinds[int(rng.integers(len(kinds)))]
                varied = self._vary(x[row], kind, spec, shape, rng)
                mine.append(PlannedRequest(c, "jitter", source, varied, int(y[row]), kind))
            per_client.append(mine)
        order = rng.permutation(np.repeat(np.arange(n_clients), self.queries))
        sent = [0] * n_clients
        out = []
        for c in order.tolist():
            out.append(per_client[c][sent[c]])
            sent[c] += 1
        return [dataclasses.replace(r, x=np.asarray(r.x, dtype=np.float32)) for r in out]

    def _vary(
        self,
        x: np.ndarray,
        kind: str,
        spec: TargetSpec,
        shape: Grid | None,
        rng: np.random.Generator,
    ) -> np.ndarray:
        if kind == "reencode":
            return reencode(x, spec, rng)
        if kind == "shift":
            shifted = augment(x[None], spec, rng, noise=0.0, shift=1, shape=shape)[0]
            if np.array_equal(shifted, x):  # a (0, 0) move: shift by one column instead
                grid = shape or Grid(1, x.size)
                image = grid.to_hwc(np.asarray(x))
                moved = np.full_like(image, float(np.broadcast_to(spec.lo, (1,))[0]))
                moved[:, 1:] = image[:, :-1]
                shifted = grid.to_row(moved)[0]
            return shifted
        return augment(x[None], spec, rng, noise=self.noise, shift=0, shape=None)[0]

    def run(
        self,
        clients: Sequence[tuple[str, Target]],
        x: np.ndarray,
        y: np.ndarray,
        rng: np.random.Generator,
        *,
        before: Sequence[tuple[tuple[str, Target], Sequence[PlannedRequest]]] = (),
    ) -> MixRun:
        """Send the mix from ``clients`` (``(name, target)``, each its own target),
        after the ``before`` requests (priming: each account and its requests)."""
        if len({id(target) for _, target in clients}) != len(clients):
            raise ValueError("each benign client needs its own target")
        started = time.perf_counter()
        spec = clients[0][1].spec
        planned = self.plan(len(clients), x, y, spec, rng)
        priming = [_send(name, target, r) for (name, target), reqs in before for r in reqs]
        outcomes = [_send(*clients[r.client], r) for r in planned]
        return MixRun(
            dataclasses.asdict(self),
            tuple(planned),
            tuple(outcomes),
            tuple(priming),
            time.perf_counter() - started,
        )


def priming_requests(
    mix: TrafficMix,
    x: np.ndarray,
    y: np.ndarray,
    spec: TargetSpec,
    rng: np.random.Generator,
    *,
    accounts: int = 5,
    mix_rng: np.random.Generator,
) -> list[list[PlannedRequest]]:
    """Per priming account: every popular input of ``mix`` (as ``mix`` will draw them
    from ``mix_rng``, a copy of the generator the mix will run with: the attacker
    guessed right), sent once exactly and once jittered."""
    rows, _, _ = mix.popular_pool(np.asarray(x), y, mix_rng)
    shape = Grid.of(spec) if spec.scalar_range else None
    out = []
    for a in range(accounts):
        mine = []
        for k in rng.permutation(len(rows)).tolist():
            base = np.asarray(x[rows[k]], dtype=np.float64)
            label = int(y[rows[k]])
            exact = base.astype(np.float32)
            mine.append(PlannedRequest(a, "priming", f"popular:{k}", exact, label))
            kind = JITTERS[a % len(JITTERS)] if shape else "reencode"
            varied = mix._vary(base, kind, spec, shape, rng).astype(np.float32)
            mine.append(PlannedRequest(a, "priming", f"popular:{k}", varied, label, kind))
        out.append(mine)
    return out


def _send(name: str, target: Target, request: PlannedRequest) -> RequestOutcome:
    answers = target.query(request.x[None])
    return RequestOutcome(
        client=name,
        category=request.category,
        source=request.source,
        status=target.log.status[-1],
        verdict=target.log.verdicts[-1],
        request_id=target.log.request_ids[-1],
        correct=bool(answers.labels[0] == request.label),
    )


@dataclass(frozen=True, slots=True)
class Judged:
    """What the guard did to one request: refused (no answer), degraded (answered,
    but a detector changed or withheld part of it), flagged (any finding)."""

    refused: bool
    degraded: bool
    flagged: bool
    denied: bool  # refused by a detector (not a validation error or an outage)


def judge(outcome: RequestOutcome, audit: AuditTrail | None) -> Judged:
    """From the audit log where given (it also sees silent actions), and the status."""
    findings = audit.of_request(outcome.request_id) if audit is not None else []
    refused = outcome.status != 200 or any(f.refusing for f in findings)
    harmed = any(f.harmful for f in findings) or outcome.verdict == "degrade"
    flagged = bool(findings) or outcome.verdict in DETECTED_VERDICTS
    denied = outcome.status in DETECTED_STATUS or any(f.refusing for f in findings)
    return Judged(refused, harmed and not refused, flagged or denied, denied)


@dataclass(frozen=True, slots=True)
class MixRun:
    params: dict[str, Any]
    planned: tuple[PlannedRequest, ...]
    outcomes: tuple[RequestOutcome, ...]
    priming: tuple[RequestOutcome, ...]
    seconds: float

    def measure(self, audit: AuditTrail | None = None) -> dict[str, Any]:
        """Refused/degraded/flagged per category and overall, and clients hit."""
        judged = [judge(o, audit) for o in self.outcomes]
        out: dict[str, Any] = {"requests": len(judged)}
        groups = {"all": list(range(len(judged)))}
        for category in CATEGORIES:
            groups[category] = [i for i, o in enumerate(self.outcomes) if o.category == category]
        for label, members in groups.items():
            n = len(members)
            refused = sum(judged[i].refused for i in members)
            degraded = sum(judged[i].degraded for i in members)
            flagged = sum(judged[i].flagged for i in members)
            out[label] = {
                "requests": n,
                "refused": refused,
                "degraded": degraded,
                "flagged": flagged,
                "harmed_fraction": (refused + degraded) / n if n else None,
            }
        clients = sorted({o.client for o in self.outcomes})
        per_client: dict[str, list[Judged]] = {c: [] for c in clients}
        for o, j in zip(self.outcomes, judged, strict=True):
            per_client[o.client].append(j)
        out["clients"] = len(clients)
        out["clients_denied"] = sum(any(j.denied for j in js) for js in per_client.values())
        out["clients_harmed"] = sum(
            any(j.refused or j.degraded for j in js) for js in per_client.values()
        )
        out["clients_flagged"] = sum(any(j.flagged for j in js) for js in per_client.values())
        out["accuracy"] = (
            sum(o.correct for o in self.outcomes) / len(self.outcomes) if self.outcomes else None
        )
        primed = {o.source for o in self.priming}
        hit = [i for i, o in enumerate(self.outcomes) if o.source in primed]
        out["primed_inputs_refused"] = sum(judged[i].refused for i in hit)
        out["primed_requests"] = len(hit)
        return out

    def summary(self, audit: AuditTrail | None = None) -> dict[str, Any]:
        """A report entry (the shared fields of :mod:`guard.attacks.report`)."""
        m = self.measure(audit)
        n = m["requests"]
        flagged = m["all"]["flagged"]
        return {
            "attack": "benign",
            "family": "benign",
            "unit": "query",
            "units": n,
            "success_rate": None,
            "queries": n,
            "detected_fraction": flagged / n if n else None,
            "first_detection_query": None,
            "detected_query_fraction": flagged / n if n else None,
            "refused_fraction": m["all"]["refused"] / n if n else None,
            "false_positive_rate": flagged / n if n else None,
            "accuracy": m["accuracy"],
            "mix": m,
            "params": self.params,
            "seconds": round(self.seconds, 3),
        }
