"""Attackers that adapt to a stateful defence: wrappers around any query-based attack.

Each wrapper is a :class:`~guard.attacks.targets.Target` around the attacker's
real target(s), so any attack of the suite (HopSkipJump, Square, SimBA, the
extraction attacks) runs through it unchanged:

:class:`Resampling`  OARS-style (Feng, Yan, Liu, Vorobeychik. "Stateful Defenses
                     for Machine Learning Models Are Not Yet Secure Against
                     Black-box Attacks." CCS 2023): every query goes out under a
                     fresh random transform (Gaussian noise of ``sigma`` times the
                     range, growing ``growth`` times per resend; optionally a
                     one-pixel shift); whenever the answer
                     tells the attacker it was caught (not a 200, a detecting
                     ``X-Guard-Verdict``, or one-hot scores where scores were
                     answered before, i.e. degraded to label-only), it resends
                     with ``growth`` times more noise, up to ``retries`` times.
                     With ``accept_label_only`` a degraded answer is kept (a
                     decision-based attacker needs only the label).
:class:`Sybil`       queries rotating over many accounts, one request each.
:class:`ResamplingSquareLinf`  OARS proper for Square L-inf: a caught query is
                     resampled from the attack's own proposal distribution,
                     widened (the window's area doubled per resample, signs drawn
                     per pixel), so the resent query stays a valid proposal
                     inside the ball and its answer is usable; the widening
                     that passed is kept for the next proposals.
:class:`Flushing`    between attack steps (every ``every`` queries), ``junk``
                     uniformly random rows from other accounts (one per flush,
                     in turn), to push the attacker's queries out of any bounded
                     history.

Wrappers nest (``Resampling(Sybil(...))``). The attack sees one answer per
query it asked; the real requests, resends and junk included, are counted in
``real_queries``. Whether an attack *succeeded* is judged afterwards by
:func:`judge_on` on its final adversarial input against the undefended model:
an attacker misled by a defence's answers has not succeeded.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from guard.attacks.budget import Oracle
from guard.attacks.evasion.base import Progress, margin
from guard.attacks.evasion.square import Grid, p_selection
from guard.attacks.extraction import augment
from guard.attacks.targets import DETECTED_VERDICTS, Answers, Target


def looks_caught(answers: Answers, status: int, verdict: str | None, *, scored: bool) -> bool:
    """Whether one answered row tells an attacker it was caught: refused, a detecting
    verdict, or (when the target gave real scores before: ``scored``) one-hot scores."""
    if status != 200 or not answers.answered[0] or verdict in DETECTED_VERDICTS:
        return True
    if not scored:
        return False
    scores = answers.scores[0]
    return bool(np.all((scores == 0.0) | (scores == 1.0)) and scores.sum() == 1.0)


class _Wrapper(Target):
    """A target that forwards to others; ``real_queries`` counts what they were sent."""

    def __init__(self, inner: Sequence[Target]) -> None:
        # The spec keeps ``input_shape`` (attacks draw on its image); ``query`` hands
        # ``_send`` rows of that shape and the inner targets take them as they are.
        super().__init__(inner[0].spec, batch_size=1)
        self.inner = list(inner)

    @property
    def real_queries(self) -> int:
        return sum(getattr(t, "real_queries", t.queries) for t in self.inner)

    def close(self) -> None:
        for target in self.inner:
            target.close()

    @staticmethod
    def _last(target: Target) -> tuple[int, str | None, str | None]:
        log = target.log
        return log.status[-1], log.verdicts[-1], log.request_ids[-1]


class Resampling(_Wrapper):
    """OARS-style resampling (see the module docstring)."""

    def __init__(
        self,
        target: Target,
        rng: np.random.Generator,
        *,
        sigma: float = 0.0005,
        growth: float = 2.0,
        retries: int = 10,
        shift: bool = False,
        accept_label_only: bool = False,
    ) -> None:
        if sigma < 0 or growth < 1 or retries < 0:
            raise ValueError(
                f"invalid resampling: sigma {sigma}, growth {growth}, retries {retries}"
            )
        super().__init__([target])
        self.rng = rng
        self.sigma = sigma
        self.growth = growth
        self.retries = retries
        self.shift = shift
        self.accept_label_only = accept_label_only
        self.resent = 0  # requests sent again after a caught answer
        self._scored = False  # seen a non-one-hot answer: one-hot now means degraded
        spec = target.spec
        self._shape = Grid.of(spec) if spec.scalar_range else None

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        (target,) = self.inner
        rows, statuses, verdict = [], [], None
        for row in np.asarray(x, dtype=np.float64).reshape(len(x), -1):
            for attempt in range(self.retries + 1):
                sigma = self.sigma * self.growth**attempt
                shift = 1 if self.shift and self._shape is not None else 0
                sent = augment(
                    row[None], self.spec, self.rng, noise=sigma, shift=shift, shape=self._shape
                )
                answers = target.query(sent)
                status, verdict, self.last_request_id = self._last(target)
                caught = looks_caught(
                    answers, status, verdict, scored=self._scored and not self.accept_label_only
                )
                if not caught:
                    self._scored = self._scored or not looks_caught(
                        answers, status, verdict, scored=True
                    )
                    break
                if attempt < self.retries:
                    self.resent += 1
            rows.append(answers)
            statuses.append(status)
        merged = Answers(
            np.concatenate([a.scores for a in rows]), np.concatenate([a.labels for a in rows])
        )
        return merged, statuses[-1], verdict


class Sybil(_Wrapper):
    """One request per account in turn (round robin over ``targets``)."""

    def __init__(self, targets: Sequence[Target]) -> None:
        if len(targets) < 1:
            raise ValueError("Sybil needs at least one account")
        super().__init__(targets)
        self.turn = 0

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        target = self.inner[self.turn % len(self.inner)]
        self.turn += 1
        answers = target.query(x)
        status, verdict, self.last_request_id = self._last(target)
        return answers, status, verdict


class Flushing(_Wrapper):
    """``junk`` random rows from one of ``junk_targets`` (other accounts, in turn)
    before every ``every``-th query of ``target``, sent ``batch`` rows per request
    (the junk targets' ``batch_size`` is raised to ``batch``)."""

    def __init__(
        self,
        target: Target,
        junk_targets: Sequence[Target],
        rng: np.random.Generator,
        *,
        every: int = 100,
        junk: int = 10_000,
        batch: int = 250,
    ) -> None:
        if every < 1 or junk < 0 or batch < 1:
            raise ValueError(f"invalid flushing: every {every}, junk {junk}, batch {batch}")
        if not junk_targets:
            raise ValueError("Flushing needs at least one junk account")
        super().__init__([target, *junk_targets])
        for junk_target in junk_targets:
            junk_target.batch_size = max(junk_target.batch_size, batch)
        self.rng = rng
        self.every = every
        self.junk = junk
        self.batch = batch
        self.flushes = 0

    @property
    def attack_queries(self) -> int:
        return self.inner[0].queries

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        target = self.inner[0]
        if target.queries and target.queries % self.every == 0 and self.junk:
            self.flush()
        answers = target.query(x)
        status, verdict, self.last_request_id = self._last(target)
        return answers, status, verdict

    def flush(self) -> None:
        junk_targets = self.inner[1:]
        junk_target = junk_targets[self.flushes % len(junk_targets)]
        spec = self.spec
        left = self.junk
        while left > 0:
            n = min(self.batch, left)
            junk_target.query(self.rng.uniform(spec.lo, spec.hi, size=(n, spec.n_features)))
            left -= n
        self.flushes += 1


@dataclass(frozen=True, slots=True)
class Judgement:
    """An evasion sample judged on the undefended model."""

    success: bool
    l2: float | None
    linf: float | None


def judge_on(
    bare: Target,
    x0: np.ndarray,
    y0: int,
    x_adv: np.ndarray | None,
    *,
    l2: float | None = None,
    linf: float | None = None,
) -> Judgement:
    """Whether ``x_adv`` fools the undefended model ``bare`` (its label is not ``y0``)
    within the given radii (input units; None: no bound). ``bare`` should not be a
    counted attack target."""
    if x_adv is None:
        return Judgement(False, None, None)
    delta = np.asarray(x_adv, dtype=np.float64) - np.asarray(x0, dtype=np.float64)
    norm2, norminf = float(np.linalg.norm(delta)), float(np.abs(delta).max())
    inside = (l2 is None or norm2 <= l2 * (1 + 1e-6)) and (
        linf is None or norminf <= linf * (1 + 1e-6)
    )
    label = int(bare.query(np.asarray(x_adv)[None]).labels[0])
    return Judgement(bool(inside and label != y0), norm2, norminf)


@dataclass(frozen=True, kw_only=True, slots=True)
class ResamplingSquareLinf:
    """Square L-inf (see :mod:`guard.attacks.evasion.square`) with OARS's adaptive
    proposals: when a query reads as caught (:func:`looks_caught` on its answer,
    status and verdict), the proposal is drawn again with the window's area doubled
    and a random sign per pixel, up to ``retries`` times, each resend a counted
    query. The widening that passed is kept (less one step) for later proposals.
    Every query stays inside the L-inf ball and the range."""

    epsilon: float
    p_init: float = 0.3
    retries: int = 6
    name: ClassVar[str] = "square-linf"

    def run(
        self,
        oracle: Oracle,
        x0: np.ndarray,
        y0: int,
        scores0: np.ndarray,
        rng: np.random.Generator,
        progress: Progress,
    ) -> None:
        spec = oracle.spec
        grid = Grid.of(spec)
        h, w, channels = grid.height, grid.width, grid.channels
        image = grid.to_hwc(x0)
        lo = grid.to_hwc(np.broadcast_to(spec.lo, x0.shape))
        hi = grid.to_hwc(np.broadcast_to(spec.hi, x0.shape))
        eps = self.epsilon
        log = oracle.target.log
        scored = not looks_caught(Answers(scores0[None], np.array([0])), 200, None, scored=True)
        best = np.clip(image + rng.choice([-eps, eps], size=(1, w, channels)), lo, hi)
        loss = margin(oracle.ask(grid.to_row(best)).scores, y0)[0]
        widen = 0
        for i in itertools.count():  # until success; the budget ends it otherwise
            if loss < 0:
                progress.found(grid.to_row(best)[0], success=True)
                return
            base = p_selection(self.p_init, i, oracle.budget)
            for attempt in range(self.retries + 1):
                level = widen + attempt
                p = min(1.0, base * 2.0**level)
                s = min(max(round(float(np.sqrt(p * h * w))), 1), min(h, w))
                r, c = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
                delta = best - image
                side = s if level else 1  # widened: a sign per pixel and channel
                signs = rng.choice([-eps, eps], size=(side, side, channels))
                delta[r : r + s, c : c + s] = signs
                candidate = np.clip(image + delta, lo, hi)
                answers = oracle.ask(grid.to_row(candidate))
                caught = looks_caught(answers, log.status[-1], log.verdicts[-1], scored=scored)
                if not caught:
                    break
            widen = min(self.retries, level + 1) if caught else max(0, level - 1)
            if caught:
                continue
            new = margin(answers.scores, y0)[0]
            if new < loss:
                best, loss = candidate, new


KINDS = ("oars", "sybil", "flushing", "labelonly", "resampling")


def accounts_needed(kind: str, *, sybil_keys: int = 10, junk_keys: int = 3) -> int:
    """API keys a ``kind`` of adaptive attacker uses (the first is its own)."""
    counts = {"oars": 1, "sybil": sybil_keys, "flushing": 1 + junk_keys, "labelonly": 1}
    return counts.get(kind, 1)


def wrap(
    kind: str, targets: Sequence[Target], rng: np.random.Generator, *, flush_every: int = 100
) -> Target:
    """The adaptive attacker ``kind`` over ``targets`` (its accounts,
    :func:`accounts_needed` of them): ``oars`` resamples on every sign of being
    caught; ``sybil`` rotates over the accounts; ``flushing`` sends 10,000 junk rows
    from the other accounts every ``flush_every`` queries of the first; ``labelonly``
    resamples on refusals only and keeps going on label-only answers; ``resampling``
    is the target itself (the attack resamples: :class:`ResamplingSquareLinf`)."""
    if kind == "oars":
        return Resampling(targets[0], rng)
    if kind == "sybil":
        return Sybil(targets)
    if kind == "flushing":
        return Flushing(targets[0], targets[1:], rng, every=flush_every)
    if kind == "labelonly":
        return Resampling(targets[0], rng, accept_label_only=True)
    if kind == "resampling":
        return targets[0]
    raise ValueError(f"unknown adaptive attacker {kind!r}; expected one of {', '.join(KINDS)}")


def real_queries(target: Target) -> int:
    """Requests' rows a (possibly wrapped) target really sent."""
    return int(getattr(target, "real_queries", target.queries))
