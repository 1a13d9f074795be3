"""What a measurement sends: the data it draws from and how much of each traffic.

The held-out rows of the model's data (a :class:`~guard.subject.Subject`: a
built-in's shipped rows, or the user's ``--data``) are split once, by a fixed permutation
that no seed changes, into three disjoint parts:

* ``calibration`` (a quarter): only for thresholds calibrated on benign data
  (``squeeze_detect``); never sent as traffic, so no threshold is judged on the
  inputs it was fitted to;
* ``benign`` (45 %): what honest clients send, as realistic traffic
  (:class:`~guard.attacks.benign.TrafficMix`, the shares of ``guard attack``'s
  benign defaults): many keyed clients; 30 % of requests are popular inputs (a
  pool of 20 of these rows that every client draws from, Zipf-weighted), 10 %
  exact retries of the client's previous request, 20 % small honest variations
  (an 8-bit re-encode, a one-pixel shift, 1 % sensor noise) of a popular or an
  own input, and the rest fresh rows of the client's own share, each sent once
  (near-duplicate detectors must tolerate the popular, retried and jittered
  ones);
* ``attacker`` (the rest): the attacker's own natural data (evasion samples,
  the extraction pool).

A seed changes the order, the popular pool, the shares, the variations and the
sample choice within those parts, never the parts themselves: a policy tuned with
one seed and re-measured with another meets new draws of the same kind of traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.attacks.registry import ATTACK, TUNABLE
from guard.attacks.targets import Target, TargetSpec
from guard.subject import Subject

SPLIT_STREAM = 7_000  # the fixed permutation's seed


@dataclass(frozen=True, slots=True)
class TuneData:
    """A model's held-out rows, split as the module says; ``subject`` is the model
    (queried undefended as the reference) and the rest of its data (members)."""

    name: str
    spec: TargetSpec
    calibration: np.ndarray
    benign_x: np.ndarray
    benign_y: np.ndarray
    attacker_x: np.ndarray
    attacker_y: np.ndarray
    subject: Subject

    @classmethod
    def builtin(cls, name: str) -> TuneData:
        return cls.of(Subject.builtin(name))

    @classmethod
    def of(cls, subject: Subject) -> TuneData:
        """The split of ``subject``'s held-out rows (its value range is needed)."""
        x, y = subject.x, subject.y
        order = np.random.default_rng(SPLIT_STREAM).permutation(len(x))
        a, b = len(x) // 4, len(x) // 4 + (len(x) * 45) // 100
        calibration, benign, attacker = order[:a], order[a:b], order[b:]
        return cls(
            name=subject.name,
            spec=subject.spec,
            calibration=x[calibration],
            benign_x=x[benign],
            benign_y=y[benign],
            attacker_x=x[attacker],
            attacker_y=y[attacker],
            subject=subject,
        )

    def reference(self) -> Target:
        """A fresh undefended target of the model (uncounted truth for judging)."""
        return self.subject.target()

    @property
    def has_members(self) -> bool:
        """Whether the data holds the model's training rows (membership attacks)."""
        return self.subject.x_members is not None

    @property
    def image(self) -> bool:
        """Whether every feature shares one range (pixels): evasion attacks apply."""
        return self.spec.scalar_range


@dataclass(frozen=True, kw_only=True, slots=True)
class Interface:
    """The names the served model answers with (an MLServer scikit-learn model answers
    ``predict_proba``, say); without a label output the label is the scores' argmax."""

    input: str = "input"
    scores: str = "probabilities"
    label: str = "label"


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """How much of each traffic one measurement sends, and how wide the search is."""

    name: str
    benign_clients: int  # each its own API key and its own share of the benign rows
    benign_queries: int  # per client, one row per request (the mix of the module)
    evasion: tuple[str, ...]  # evasion attack names of guard.attacks.registry
    evasion_samples: int
    evasion_budget: int  # queries per sample
    knockoff_budgets: tuple[int, ...]  # curve points; the last is the total
    jbda_budget: int
    membership: tuple[str, ...]  # "threshold" (loss and confidence), "label-only"
    membership_records: int  # records the label-only attack queries (51 queries each)
    surrogate_steps: int  # training steps of each extraction surrogate
    certify_inputs: int
    grid: str  # "small" or "full": the width of each parameter's grid
    passes: int  # coordinate-descent passes over the parameters


WORKLOADS = {
    "small": Workload(
        name="small",
        benign_clients=20,
        benign_queries=30,
        evasion=("simba", "square-linf"),
        evasion_samples=3,
        evasion_budget=150,
        knockoff_budgets=(50, 100, 200),
        jbda_budget=250,
        membership=("threshold",),
        membership_records=150,
        surrogate_steps=300,
        certify_inputs=100,
        grid="small",
        passes=1,
    ),
    "full": Workload(
        name="full",
        benign_clients=32,
        benign_queries=25,
        evasion=("hopskipjump", "square-linf", "square-l2", "simba"),
        evasion_samples=10,
        evasion_budget=1000,
        knockoff_budgets=(100, 250, 500, 1000),
        jbda_budget=1000,
        membership=("threshold", "label-only"),
        membership_records=300,
        surrogate_steps=1000,
        certify_inputs=400,
        grid="full",
        passes=2,
    ),
}


def attacks_for(stages: set[str], workload: Workload, data: TuneData) -> tuple[str, ...]:
    """The attack names a measurement runs for a policy with these tuned stages (an
    attack's ``tunes`` in :mod:`guard.attacks.registry`), in order: the workload's evasion
    attacks (image data only), then the others in the registry's order. Membership needs
    member rows in the data: without them it is left out."""

    def measures(name: str) -> bool:
        if name == "membership" and not data.has_members:
            return False
        return bool(stages & set(ATTACK[name].tunes))

    evasion = [n for n in workload.evasion if data.image and measures(n)]
    others = [n for n in TUNABLE if ATTACK[n].family != "evasion" and measures(n)]
    return (*evasion, *others)
