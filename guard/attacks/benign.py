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
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from guard.attacks.detection import detection
from guard.attacks.evasion.square import image_shape
from guard.attacks.extraction import augment
from guard.attacks.targets import Target


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
        shape = image_shape(x.shape[1], None) if self.shift else None
        plans = []
        shares = np.array_split(rng.permutation(len(x)), len(clients))
        for (_, target), share in zip(clients, shares, strict=True):
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
