"""What each output defence buys: accuracy, membership, extraction and inversion, measured.

    python -m tests.benchmarks.measure_privacy [--models digits breast_cancer] [--json out.json]

Prints markdown tables (the ones in docs/privacy.md). Everything is seeded: the
same versions give the same numbers. The defended model is the demo ONNX model
with a mechanism of :mod:`guard.defenses.privacy` applied to its scores, keyed
as the ``privacy`` stage keys it (one generator per input row), so what is
measured is what the stage serves.

Utility: top-1 accuracy on non-members, and how much confidence information
survives: the Pearson correlation between the released and the model's own
probability of the model's top-1 class (1: untouched; 0 for label-only answers,
whose confidence is always 1).

Attacks (members: the model's training rows; non-members: its held-out rows):

* Confidence membership (Yeom et al., CSF 2018): the released probability of
  the true class, thresholded.
* Label-only membership (Choquette-Choo et al., ICML 2021, noise robustness):
  the fraction of ``K`` Gaussian-perturbed copies of a row (plus the row) whose
  released label is the true one, thresholded; the attacker picks the noise
  level on its calibration half.

  Advantage = TPR - FPR on an evaluation half, with the threshold (and noise
  level) chosen on the other half; mean ± standard deviation over 20 random
  halvings. Choosing
  the threshold on the same rows it is scored on would report ~0.03 on a model
  that leaks nothing.
* Extraction (Knockoff Nets, Orekondy et al., CVPR 2019, random strategy): two
  fixed budgets of non-member rows asked once each, the suite's
  :class:`~guard.attacks.surrogate.Surrogate` trained on the released scores
  and, separately, on the released labels; fidelity (agreement with the
  undefended model on other non-members) is the better of the two.
* Inversion (Fredrikson et al., CCS 2015, black-box): for each class, NES
  gradient ascent on its released probability from the mean input; similarity
  is the cosine between the recovered input and the class's mean training row
  (both relative to the mean, in standardised units), averaged over classes.

The attacks are implemented here, minimally, on the suite's targets and
surrogate.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.attacks.extraction import Evaluation
from guard.attacks.surrogate import Surrogate
from guard.attacks.targets import Answers, OnnxTarget, Target, TargetSpec
from guard.defenses.privacy import (
    Gaussian,
    LabelOnly,
    Laplace,
    Mechanism,
    ReverseSigmoid,
    Rounding,
    consistent_generators,
    degrade_outputs,
)
from guard.models import load_split, model_path

SECRET = b"measure-privacy-secret-key"
SPLITS = 20
SEED = 0


# -- the defended model -------------------------------------------------------------


class DefendedTarget(Target):
    """The demo model with ``mechanism`` applied to its scores, as the privacy stage does."""

    def __init__(
        self,
        name: str,
        mechanism: Mechanism | None,
        *,
        consistent: bool = True,
        rng: np.random.Generator | None = None,
    ) -> None:
        from guard.backends.onnx import OnnxBackend

        super().__init__(TargetSpec.builtin(name), batch_size=1 << 16)
        self.backend = OnnxBackend(model_path(name), name=name, device="cpu", threads=1)
        self.mechanism = mechanism
        self.consistent = consistent
        self.rng = rng if rng is not None else np.random.default_rng(SEED)

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        outputs = self.backend.run({"input": x})
        m = self.mechanism
        if m is not None:
            rng: Any = self.rng
            if m.noisy and self.consistent:
                rng = consistent_generators(SECRET, ("bench", m.fingerprint()), {"input": x})
            outputs = degrade_outputs(outputs, mechanism=m, rng=rng)
        return self._answers(outputs, len(x), "probabilities", "label"), 200, None


# -- membership ---------------------------------------------------------------------


def best_threshold(members: np.ndarray, nonmembers: np.ndarray) -> tuple[float, float]:
    """``(threshold, advantage)``: predicting member when score >= threshold, best TPR - FPR."""
    candidates = np.unique(np.concatenate([members, nonmembers, [np.inf]]))
    m = np.sort(members)
    n = np.sort(nonmembers)
    tpr = 1.0 - np.searchsorted(m, candidates, side="left") / len(m)
    fpr = 1.0 - np.searchsorted(n, candidates, side="left") / len(n)
    i = int(np.argmax(tpr - fpr))
    return float(candidates[i]), float(tpr[i] - fpr[i])


def advantage(scores_m: np.ndarray, scores_n: np.ndarray) -> tuple[float, float]:
    """Held-out TPR - FPR of a threshold chosen on the other half, averaged over halvings.

    ``scores_*`` are ``[V, N]``: one row per attack variant (e.g. noise level);
    the variant and the threshold are both chosen on the calibration half. Every
    call uses the same halvings, so equal scores give equal advantages. Returns
    the mean and the standard deviation over the halvings.
    """
    rng = np.random.default_rng([SEED, 6])
    scores_m, scores_n = np.atleast_2d(scores_m), np.atleast_2d(scores_n)
    results = []
    for _ in range(SPLITS):
        pm, pn = rng.permutation(scores_m.shape[1]), rng.permutation(scores_n.shape[1])
        cm, em = pm[: len(pm) // 2], pm[len(pm) // 2 :]
        cn, en = pn[: len(pn) // 2], pn[len(pn) // 2 :]
        fits = [best_threshold(s_m[cm], s_n[cn]) for s_m, s_n in zip(scores_m, scores_n, strict=True)]
        v = int(np.argmax([adv for _, adv in fits]))
        t = fits[v][0]
        results.append(np.mean(scores_m[v, em] >= t) - np.mean(scores_n[v, en] >= t))
    return float(np.mean(results)), float(np.std(results))


def confidence_scores(target: Target, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return target.query(x).scores[np.arange(len(y)), y]


def label_only_scores(
    target: Target,
    x: np.ndarray,
    y: np.ndarray,
    noise: tuple[float, ...],
    scale: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    rng: np.random.Generator,
    copies: int = 16,
) -> np.ndarray:
    """``[len(noise), N]``: fraction of the row and its noisy copies labelled ``y``."""
    out = []
    clean = target.query(x).labels == y
    for sigma in noise:
        noisy = x[None] + rng.normal(0.0, 1.0, (copies, *x.shape)) * (sigma * scale)
        labels = target.query(np.clip(noisy, lo, hi).reshape(-1, x.shape[1])).labels
        right = (labels.reshape(copies, len(y)) == y).sum(axis=0) + clean
        out.append(right / (copies + 1))
    return np.stack(out)


# -- inversion ----------------------------------------------------------------------


def invert(
    target: Target,
    cls: int,
    mean: np.ndarray,
    scale: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    rng: np.random.Generator,
    *,
    steps: int = 60,
    samples: int = 20,
    sigma: float = 0.5,
    step: float = 0.5,
) -> np.ndarray:
    """NES ascent on the released probability of ``cls``, in standardised units from ``mean``."""
    z = np.zeros_like(mean)
    for _ in range(steps):
        u = rng.normal(0.0, 1.0, (samples, len(z)))
        probes = np.concatenate([z + sigma * u, z - sigma * u])
        x = np.clip(mean + probes * scale, lo, hi)
        p = target.query(x).scores[:, cls]
        grad = ((p[:samples] - p[samples:])[:, None] * u).sum(axis=0)
        norm = np.linalg.norm(grad)
        if norm > 0:
            z = z + step * grad / norm
    return z


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (it tells nothing)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


# -- one model, one mechanism -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    label: str
    mechanism: Mechanism | None


@dataclass(frozen=True, slots=True)
class Data:
    name: str
    xm: np.ndarray
    ym: np.ndarray
    xn: np.ndarray
    yn: np.ndarray
    pool: np.ndarray  # non-members the extraction attacker queries
    held_x: np.ndarray  # non-members fidelity is measured on
    held_y: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    scale: np.ndarray  # per-feature spread, for perturbations
    noise: tuple[float, ...]  # label-only perturbation levels (times ``scale``)
    budgets: tuple[int, ...]  # extraction queries


def load(name: str) -> Data:
    split = load_split(name)
    rng = np.random.default_rng([SEED, 1])
    order = rng.permutation(len(split.y_nonmembers))
    half = len(order) // 2
    spec = TargetSpec.builtin(name)
    lo = np.broadcast_to(spec.lo, (spec.n_features,)).astype(np.float64)
    hi = np.broadcast_to(spec.hi, (spec.n_features,)).astype(np.float64)
    pool = split.x_nonmembers[order[:half]]
    std = pool.std(axis=0)
    image = name == "digits"
    return Data(
        name=name,
        xm=split.x_members,
        ym=split.y_members,
        xn=split.x_nonmembers,
        yn=split.y_nonmembers,
        pool=pool,
        held_x=split.x_nonmembers[order[half:]],
        held_y=split.y_nonmembers[order[half:]],
        lo=lo,
        hi=hi,
        # pixels share one unit; tabular features each get their own spread
        scale=np.ones_like(lo) if image else np.where(std > 0, std, 1.0),
        noise=(1.0, 2.0, 4.0) if image else (0.1, 0.3, 1.0),
        budgets=(100, 250) if image else (25, 100),
    )


def measure(data: Data, setting: Setting) -> dict[str, Any]:
    rng = np.random.default_rng([SEED, 2])
    target = DefendedTarget(data.name, setting.mechanism)
    released = target.query(data.xn)
    accuracy = float(np.mean(released.labels == data.yn))
    truth = OnnxTarget.builtin(data.name).query(data.xn).scores
    top = np.argmax(truth, axis=1)
    rows = np.arange(len(top))
    utility = correlation(released.scores[rows, top], truth[rows, top])
    conf = advantage(confidence_scores(target, data.xm, data.ym), confidence_scores(target, data.xn, data.yn))
    label_m = label_only_scores(target, data.xm, data.ym, data.noise, data.scale, data.lo, data.hi, rng)
    label_n = label_only_scores(target, data.xn, data.yn, data.noise, data.scale, data.lo, data.hi, rng)
    label = advantage(label_m, label_n)
    fidelity = extraction_fidelity(data, target)
    similarity = inversion_similarity(data, target)
    return {
        "setting": setting.label,
        "accuracy": accuracy,
        "confidence_correlation": utility,
        "confidence_advantage": conf,
        "label_only_advantage": label,
        "extraction_fidelity": fidelity,
        "inversion_similarity": similarity,
    }


def extraction_fidelity(data: Data, target: Target) -> dict[str, dict[str, float]]:
    """Knockoff (random strategy): pool rows asked once; at each budget, a surrogate trained
    on the released scores and one on the released labels, scored on held-out rows."""
    spec = target.spec
    evaluation = Evaluation.of(OnnxTarget.builtin(data.name), data.held_x, data.held_y)
    rng = np.random.default_rng([SEED, 3])
    x = data.pool[rng.permutation(len(data.pool))[: max(data.budgets)]]
    answers = target.query(x)
    labels = np.eye(spec.n_classes)[answers.labels]
    result = {}
    for budget in data.budgets:
        fidelity = {}
        for view, targets in (("scores", answers.scores), ("labels", labels)):
            surrogate = Surrogate(spec.n_features, spec.n_classes)
            surrogate.fit(x[:budget], targets[:budget], rng=np.random.default_rng([SEED, 3]))
            fidelity[view] = evaluation.score(surrogate)[0]
        result[str(budget)] = fidelity
    return result


def inversion_similarity(data: Data, target: Target) -> float:
    rng = np.random.default_rng([SEED, 4])
    mean = data.pool.mean(axis=0)
    sims = []
    for c in range(target.spec.n_classes):
        z = invert(target, c, mean, data.scale, data.lo, data.hi, rng)
        truth = (data.xm[data.ym == c].mean(axis=0) - mean) / data.scale
        sims.append(cosine(z, truth))
    return float(np.mean(sims))


# -- repeated queries: fresh against consistent noise ---------------------------------


def repeats(data: Data, mechanism: Mechanism, n: int = 100) -> list[dict[str, Any]]:
    """Confidence membership, and how well the released true-class score tracks the model's
    (Pearson correlation), when each row is asked ``n`` times and the answers averaged."""
    rng = np.random.default_rng([SEED, 5])
    truth = OnnxTarget.builtin(data.name)
    x = np.concatenate([data.xm, data.xn])
    y = np.concatenate([data.ym, data.yn])
    members = np.arange(len(x)) < len(data.xm)
    true_p = confidence_scores(truth, x, y)
    rows = []
    cases: list[tuple[str, bool, Callable[[np.ndarray], np.ndarray]]] = [
        ("fresh noise, same input", False, lambda v: v),
        ("consistent noise, same input", True, lambda v: v),
        # A nearby input gets its own noise: only the budget limits this.
        ("consistent noise, input + U(±1e-3)", True, lambda v: v + rng.uniform(-1e-3, 1e-3, v.shape)),
    ]
    for label, consistent, vary in cases:
        target = DefendedTarget(data.name, mechanism, consistent=consistent, rng=np.random.default_rng(SEED))
        single = confidence_scores(target, x, y)
        total = np.zeros(len(x))
        for _ in range(n):
            total += confidence_scores(target, np.clip(vary(x), data.lo, data.hi).astype(np.float32), y)
        mean = total / n
        rows.append(
            {
                "case": label,
                "advantage_1": advantage(single[members], single[~members]),
                f"advantage_{n}": advantage(mean[members], mean[~members]),
                "correlation_1": correlation(single, true_p),
                f"correlation_{n}": correlation(mean, true_p),
                "identical": bool(np.array_equal(mean, single)),
            }
        )
    return rows


# -- main -----------------------------------------------------------------------------


def settings(recommended: Mechanism) -> list[Setting]:
    return [
        Setting("none", None),
        Setting("round, 2 decimals", Rounding(decimals=2)),
        Setting("round, 1 decimal", Rounding(decimals=1)),
        Setting("top-1 (label only)", LabelOnly()),
        Setting("laplace ε=8", Laplace(epsilon=8.0)),
        Setting("laplace ε=4", Laplace(epsilon=4.0)),
        Setting("laplace ε=2", Laplace(epsilon=2.0)),
        Setting("laplace ε=1", Laplace(epsilon=1.0)),
        Setting("laplace ε=4, keep_argmax off", Laplace(epsilon=4.0, keep_argmax=False)),
        Setting("gaussian σ=0.5", Gaussian(sigma=0.5)),
        Setting("gaussian σ=1", Gaussian(sigma=1.0)),
        Setting("reverse sigmoid β=1 γ=0.1", ReverseSigmoid(beta=1.0, gamma=0.1)),
        Setting("recommended", recommended),
    ]


RECOMMENDED = Laplace(epsilon=2.0)


def table(rows: list[dict[str, Any]], budgets: tuple[int, ...]) -> str:
    fid = " / ".join(f"@{b}" for b in budgets)
    lines = [
        f"| setting | top-1 acc | confidence corr. | conf. MIA adv | label-only MIA adv | "
        f"extraction fidelity {fid} | inversion sim |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        conf, label = r["confidence_advantage"], r["label_only_advantage"]
        fidelity = " / ".join(f"{max(f.values()):.3f}" for f in r["extraction_fidelity"].values())
        lines.append(
            f"| {r['setting']} | {r['accuracy']:.4f} | {r['confidence_correlation']:.3f} | "
            f"{conf[0]:.3f} ± {conf[1]:.3f} | {label[0]:.3f} ± {label[1]:.3f} | {fidelity} | "
            f"{r['inversion_similarity']:.3f} |"
        )
    return "\n".join(lines)


def repeats_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| answers | conf. MIA adv, 1 answer | conf. MIA adv, mean of 100 | "
        "corr. with true score, 1 | corr., mean of 100 | 100 answers identical |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['advantage_1'][0]:.3f} | {r['advantage_100'][0]:.3f} | "
            f"{r['correlation_1']:.3f} | {r['correlation_100']:.3f} | {'yes' if r['identical'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["digits", "breast_cancer"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--only", nargs="*", help="settings to run (labels); default all")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for name in args.models:
        data = load(name)
        started = time.perf_counter()
        rows = [
            measure(data, s)
            for s in settings(RECOMMENDED)
            if not args.only or s.label in args.only
        ]
        print(f"\n### {name} (recommended: {RECOMMENDED.fingerprint()})\n")
        print(table(rows, data.budgets))
        rep = repeats(data, RECOMMENDED)
        print(f"\nRepeats, {RECOMMENDED.fingerprint()}:\n")
        print(repeats_table(rep))
        print(f"\n({time.perf_counter() - started:.0f} s)")
        results[name] = {"settings": rows, "repeats": rep}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
