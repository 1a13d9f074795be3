"""What each output defence buys: accuracy, membership, extraction and inversion, measured.

    python -m tests.benchmarks.measure_privacy [--models digits breast_cancer shapes]
        [--only SETTING ...] [--no-repeats] [--json out.json]

Any built-in model can be named; rows stay flat and reach the model in its input
shape (``input_shape`` of its sidecar, :mod:`tests.benchmarks.model_inputs`).

Prints markdown tables (the ones in docs/privacy.md). Everything is seeded: the
same versions give the same numbers. The defended model is the demo ONNX model
with a mechanism of :mod:`guard.defenses.privacy` applied to its scores, keyed
as the ``privacy`` stage keys it (one generator per input row), so what is
measured is what the stage serves. The attacks are the offline suite's
(:mod:`guard.attacks`), run against that target.

Utility: top-1 accuracy on held-out rows, and how much confidence information
survives: the Pearson correlation between the released and the model's own
probability of the model's top-1 class (1: untouched; 0 for label-only answers,
whose confidence is always 1).

Membership, over every training member and every held-out non-member (the
suite's attacks; their attacker data, which only sets the label-only noise
scale, is the non-members): ``membership-loss`` (Yeom et al., CSF 2018, ``log p_y``) and
``membership-label-only`` (Choquette-Choo et al., ICML 2021, 50 noisy
neighbours per record). Their advantage is reported as an attacker would get
it: TPR - FPR on one half of the records, with the threshold chosen on the
other half; mean ± standard deviation over 20 random halvings. The suite's own
figure (the best threshold on all records, an upper bound) is in the JSON.

Extraction (Knockoff Nets, Orekondy et al., CVPR 2019, random strategy): held-out
rows split into the attacker's pool and an evaluation half; at each budget the
suite's :class:`~guard.attacks.surrogate.Surrogate` is trained on the released
scores and, separately, on the released labels; fidelity (agreement with the
undefended model on the evaluation half) is the better of the two.

Inversion: the suite's :class:`~guard.attacks.inversion.Inversion` (NES ascent
on ``log p_c``, 2,000 queries per class); centred cosine similarity of each
reconstruction to its class's held-out mean, averaged over classes, and the
number of classes identified.
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
from guard.attacks.inversion import Inversion
from guard.attacks.membership import (
    MembershipData,
    MembershipRun,
    label_only_attack,
    threshold_attacks,
)
from guard.attacks.surrogate import Surrogate
from guard.attacks.targets import Answers, Target, TargetSpec
from guard.defenses.privacy import (
    ConfidenceBins,
    Gaussian,
    LabelOnly,
    Laplace,
    Mechanism,
    ReverseSigmoid,
    Rounding,
    consistent_generators,
    degrade_outputs,
)
from guard.models import MODELS, load_split, model_path
from tests.benchmarks.model_inputs import flat, onnx_target, samples, to_model

SECRET = b"measure-privacy-secret-key"
SPLITS = 20
SEED = 0
INVERSION_BUDGET = 2000
RECOMMENDED = Laplace(epsilon=2.0)
BUDGETS = {"breast_cancer": (25, 100)}  # extraction queries; (100, 250) for the others
SURROGATE_STEPS = 1500  # Adam steps of each extraction surrogate (Surrogate.fit's default)


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
        self.name = name
        self.backend = OnnxBackend(model_path(name), name=name, device="cpu", threads=1)
        self.mechanism = mechanism
        self.consistent = consistent
        self.rng = rng if rng is not None else np.random.default_rng(SEED)

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        outputs = self.backend.run({"input": to_model(x, self.name)})
        m = self.mechanism
        if m is not None:
            rng: Any = self.rng
            if m.noisy and self.consistent:
                rng = consistent_generators(SECRET, ("bench", m.fingerprint()), {"input": x})
            outputs = degrade_outputs(outputs, mechanism=m, rng=rng)
        return self._answers(outputs, len(x), "probabilities", "label"), 200, None


# -- statistics ---------------------------------------------------------------------


def best_threshold(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """The threshold t maximising TPR - FPR of "member when score >= t"."""
    candidates = np.unique(np.concatenate([members, nonmembers, [np.inf]]))
    tpr = 1.0 - np.searchsorted(np.sort(members), candidates, side="left") / len(members)
    fpr = 1.0 - np.searchsorted(np.sort(nonmembers), candidates, side="left") / len(nonmembers)
    return float(candidates[int(np.argmax(tpr - fpr))])


def advantage(scores: np.ndarray, member: np.ndarray) -> tuple[float, float]:
    """Held-out TPR - FPR of a threshold chosen on the other half: mean and sd over halvings.

    Every call uses the same halvings, so equal scores give equal advantages.
    """
    rng = np.random.default_rng([SEED, 6])
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    results = []
    for _ in range(SPLITS):
        calibration = rng.permutation(len(scores)) < len(scores) // 2
        t = best_threshold(scores[calibration & member], scores[calibration & ~member])
        held_m, held_n = scores[~calibration & member], scores[~calibration & ~member]
        results.append(np.mean(held_m >= t) - np.mean(held_n >= t))
    return float(np.mean(results)), float(np.std(results))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (it tells nothing)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def membership(run: MembershipRun) -> dict[str, Any]:
    curve = run.roc
    return {
        "advantage": advantage(run.scores, run.member),
        "best_threshold_advantage": curve.advantage,
        "auc": curve.auc,
    }


# -- one model, one mechanism -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    label: str
    mechanism: Mechanism | None


@dataclass(frozen=True, slots=True)
class Data:
    name: str
    members: MembershipData
    x: np.ndarray  # held-out rows and labels (the suite's samples)
    y: np.ndarray
    pool: np.ndarray  # indices into x the extraction attacker queries
    held: np.ndarray  # indices into x fidelity is measured on
    budgets: tuple[int, ...]  # extraction queries


def load(name: str) -> Data:
    x, y = samples(name)
    order = np.random.default_rng([SEED, 1]).permutation(len(x))
    split = load_split(name)
    records = np.concatenate([flat(split.x_members), flat(split.x_nonmembers)]).astype(np.float64)
    members = MembershipData(
        x=records,
        y=np.concatenate([split.y_members, split.y_nonmembers]),
        member=np.arange(len(records)) < len(split.x_members),
        x_attacker=flat(split.x_nonmembers).astype(np.float64),
        y_attacker=split.y_nonmembers,
    )
    return Data(
        name=name,
        members=members,
        x=x,
        y=y,
        pool=order[: len(x) // 2],
        held=order[len(x) // 2 :],
        budgets=BUDGETS.get(name, (100, 250)),
    )


def measure(data: Data, setting: Setting) -> dict[str, Any]:
    target = DefendedTarget(data.name, setting.mechanism)
    released = target.query(data.x)
    truth = onnx_target(data.name).query(data.x).scores
    top = np.argmax(truth, axis=1)
    rows = np.arange(len(top))
    loss = threshold_attacks(target, data.members)[0]
    label_only = label_only_attack(target, data.members, np.random.default_rng([SEED, 3]))
    inversion = Inversion().run(
        target, data.x, data.y, budget=INVERSION_BUDGET, rng=np.random.default_rng([SEED, 4])
    )
    summary = inversion.summary(target)
    return {
        "setting": setting.label,
        "mechanism": setting.mechanism.fingerprint() if setting.mechanism else None,
        "accuracy": float(np.mean(released.labels == data.y)),
        "confidence_correlation": correlation(released.scores[rows, top], truth[rows, top]),
        "membership_loss": membership(loss),
        "membership_label_only": membership(label_only),
        "extraction_fidelity": extraction_fidelity(data, target),
        "inversion_similarity": summary["similarity"],
        "inversion_baseline": summary["baseline_similarity"],
        "inversion_identified": summary["success_rate"],
    }


def extraction_fidelity(data: Data, target: Target) -> dict[str, dict[str, float]]:
    """Pool rows asked once; at each budget a surrogate trained on the released scores and
    one on the released labels, scored against the undefended model on held-out rows."""
    spec = target.spec
    evaluation = Evaluation.of(onnx_target(data.name), data.x[data.held], data.y[data.held])
    x = data.x[data.pool[: max(data.budgets)]]
    answers = target.query(x)
    labels = np.eye(spec.n_classes)[answers.labels]
    result = {}
    for budget in data.budgets:
        fidelity = {}
        for view, targets in (("scores", answers.scores), ("labels", labels)):
            surrogate = Surrogate(spec.n_features, spec.n_classes)
            surrogate.fit(
                x[:budget],
                targets[:budget],
                rng=np.random.default_rng([SEED, 5]),
                steps=SURROGATE_STEPS,
            )
            fidelity[view] = evaluation.score(surrogate)[0]
        result[str(budget)] = fidelity
    return result


# -- repeated queries: fresh against consistent noise ---------------------------------


def repeats(data: Data, mechanism: Mechanism, n: int = 100) -> list[dict[str, Any]]:
    """Loss-threshold membership, and how well the released true-class probability tracks
    the model's (Pearson correlation), when each record is asked ``n`` times and averaged."""
    rng = np.random.default_rng([SEED, 7])
    m = data.members
    rows = np.arange(len(m.y))
    true_p = onnx_target(data.name).query(m.x).scores[rows, m.y]
    spec = TargetSpec.builtin(data.name)
    cases: list[tuple[str, bool, Callable[[np.ndarray], np.ndarray]]] = [
        ("fresh noise, same input", False, lambda v: v),
        ("consistent noise, same input", True, lambda v: v),
        # A nearby input gets its own noise: only the budget limits this.
        (
            "consistent noise, input + U(±1e-3)",
            True,
            lambda v: v + rng.uniform(-1e-3, 1e-3, v.shape),
        ),
    ]
    results = []
    for label, consistent, vary in cases:
        target = DefendedTarget(data.name, mechanism, consistent=consistent)
        single = target.query(m.x).scores[rows, m.y]
        mean = np.mean(
            [target.query(spec.clip(vary(m.x))).scores[rows, m.y] for _ in range(n)], axis=0
        )
        results.append(
            {
                "case": label,
                "advantage_1": advantage(single, m.member),
                f"advantage_{n}": advantage(mean, m.member),
                "correlation_1": correlation(single, true_p),
                f"correlation_{n}": correlation(mean, true_p),
                "identical": bool(np.array_equal(mean, single)),
            }
        )
    return results


# -- main -----------------------------------------------------------------------------


SETTINGS = [
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
    # Levels calibrated as in measure_privacy_utility (those of the default policy).
    Setting("bins 0.5, all ranked", ConfidenceBins(cuts=(0.5,), confidences=(0.48, 0.975))),
    Setting(
        "bins 0.5, ranked 1 (digits default)",
        ConfidenceBins(cuts=(0.5,), confidences=(0.48, 0.975), ranked=1),
    ),
    Setting("bins 0.5, ranked 0", ConfidenceBins(cuts=(0.5,), confidences=(0.48, 0.975), ranked=0)),
    Setting("bins, one bin (breast_cancer default)", ConfidenceBins(confidences=(0.94,))),
    Setting("recommended", RECOMMENDED),
]


def table(rows: list[dict[str, Any]], budgets: tuple[int, ...]) -> str:
    fid = " / ".join(f"@{b}" for b in budgets)
    lines = [
        "| setting | top-1 acc | conf. corr. | loss MIA adv | label-only MIA adv | "
        f"extraction fidelity {fid} | inversion sim (identified) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = r["membership_loss"]["advantage"]
        label = r["membership_label_only"]["advantage"]
        fidelity = " / ".join(f"{max(f.values()):.3f}" for f in r["extraction_fidelity"].values())
        lines.append(
            f"| {r['setting']} | {r['accuracy']:.4f} | {r['confidence_correlation']:.3f} | "
            f"{loss[0]:.3f} ± {loss[1]:.3f} | {label[0]:.3f} ± {label[1]:.3f} | {fidelity} | "
            f"{r['inversion_similarity']:.3f} ({r['inversion_identified']:.0%}) |"
        )
    return "\n".join(lines)


def repeats_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| answers | loss MIA adv, 1 answer | mean of 100 | corr. with true p_y, 1 answer | "
        "mean of 100 | 100 answers identical |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['advantage_1'][0]:.3f} | {r['advantage_100'][0]:.3f} | "
            f"{r['correlation_1']:.3f} | {r['correlation_100']:.3f} | "
            f"{'yes' if r['identical'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global SURROGATE_STEPS
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["digits", "breast_cancer"], choices=MODELS)
    parser.add_argument("--only", nargs="*", help="settings to run (their labels); default all")
    parser.add_argument(
        "--no-repeats", action="store_true", help="leave out the repeated-queries table"
    )
    parser.add_argument(
        "--surrogate-steps",
        type=int,
        default=SURROGATE_STEPS,
        help=f"Adam steps per extraction surrogate ({SURROGATE_STEPS}; each step costs in "
        "proportion to the input size: fewer on shapes' 3,072 values)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    SURROGATE_STEPS = args.surrogate_steps
    results: dict[str, Any] = {}
    for name in args.models:
        data = load(name)
        started = time.perf_counter()
        rows = [measure(data, s) for s in SETTINGS if not args.only or s.label in args.only]
        rep = [] if args.no_repeats else repeats(data, RECOMMENDED)
        print(f"\n### {name} (recommended: {RECOMMENDED.fingerprint()})\n")
        print(table(rows, data.budgets))
        if rep:
            print(f"\nRepeated queries, {RECOMMENDED.fingerprint()}:\n")
            print(repeats_table(rep))
        print(f"\n({time.perf_counter() - started:.0f} s)", flush=True)
        results[name] = {"settings": rows, "repeats": rep}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
