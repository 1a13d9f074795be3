"""Privacy against utility of each output mechanism, measured through the guard.

    python tests/benchmarks/measure_privacy_utility.py [--models digits breast_cancer shapes]
        [--shadows 16] [--sets 3] [--label-only 100] [--json out.json]

Any built-in model can be named; rows stay flat and go to the guard in the model's
input shape (``input_shape`` of its sidecar, :mod:`tests.benchmarks.model_inputs`).

One in-process guard (:class:`~guard.attacks.guarded.InProcessGuard`, real HTTP on
127.0.0.1) serves every setting of every model as its own model name, each with the
stages ``validate`` (as in the default policy) and ``privacy`` with that setting's
mechanism (none for ``none``); detection stages are left out so only the mechanism
decides what is released. Every number comes from answers the guard served.

Records: every training member and every held-out non-member of the built-in model
(digits 898 / 899, breast_cancer 284 / 285). The held-out rows are halved at random
(seeded): the first half *calibrates* the ``bins`` settings (each level is the
model's accuracy on the calibration rows whose top probability falls in that bin,
histogram binning), the second half is where utility is measured.

Utility, on the second half of the held-out rows:

- **acc.**: top-1 accuracy of the released label (the model: digits 0.974,
  breast_cancer 0.940 on all held-out rows).
- **L1**: mean ``‖released − model‖₁`` per answer (0 to 2).
- **ECE**: expected calibration error of the released top probability, 15 equal
  bins (the model's own is the ``none`` row).
- **top-2**: share of answers whose two highest classes, in order, are the model's.
- **conf. ρ**: Spearman correlation, across answers, of the released and the model's
  top probability: whether answers can still be ranked by confidence (0 when the
  released confidence is constant).

Membership, over all records (the targets: advantage ≤ 0.02, LiRA TPR at 0.1% FPR
≤ 2× chance = 0.002):

- **loss adv.**: Yeom et al.'s loss threshold on the released ``log p_y``; the
  best threshold on all records (an upper bound), and in brackets the held-out
  estimate of ``measure_privacy`` (threshold picked on one half, scored on the
  other, mean of 20 halvings).
- **LiRA**: Carlini et al.'s online LiRA (:class:`guard.attacks.membership.
  LiraReference`): ``--shadows`` shadow models of the target's recipe (those of
  ``guard attack``) on random halves of all records; TPR at 0.1% and 1% FPR and the
  AUC, each the mean over ``--sets`` independent sets of shadows (one set's ranking
  of the records is noisy). With fewer than 1,000 non-members, TPR at 0.1% FPR is
  the TPR at no false positive at all: one member ranked above every non-member is
  0.0011 on digits, 0.0035 on breast_cancer.
- **floor**: TPR − FPR of "member when the released label is right": what the
  label alone gives (every setting here keeps it), the least any label-keeping
  mechanism can leave to the loss attack's best threshold on breast_cancer (two
  classes: a right label always has ``p_y > 1/2``), and nearly so on digits.

Needs scikit-learn (the ``attacks`` extra) for LiRA's shadow models. About a
minute per model on two shared cores (most of it digits' shadow MLPs).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from guard.attacks.guarded import (
    DEFAULT_POLICY,
    InProcessGuard,
    api_key,
    measurement_policy,
)
from guard.attacks.membership import (
    LOW_FPR,
    LiraReference,
    MembershipData,
    label_only_attack,
    log_likelihood,
    membership_data,
    roc,
)
from guard.attacks.targets import TargetSpec
from guard.extras import installed
from guard.models import MODELS, load_split
from tests.benchmarks.model_inputs import flat, http_target, onnx_target

SEED = 0
CLIENT = "measure"
ECE_BINS = 15
SPLITS = 20
CHANCE = LOW_FPR


@dataclass(frozen=True, slots=True)
class Setting:
    label: str
    privacy: dict[str, Any] | None  # the privacy stage's section; None: no stage


def settings(name: str, calibration: tuple[np.ndarray, np.ndarray]) -> list[Setting]:
    """The default policy's, the old default (Laplace ε = 2), less noise, and bins."""
    default = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    shipped = [s["privacy"] for s in default["models"][name]["stages"] if "privacy" in s]
    found = [
        Setting("none", None),
        Setting("default policy", shipped[0] if shipped else None),
        Setting("laplace ε=2 (old default)", {"mechanism": "laplace", "epsilon": 2.0}),
        Setting("laplace ε=8", {"mechanism": "laplace", "epsilon": 8.0}),
        Setting("laplace ε=20", {"mechanism": "laplace", "epsilon": 20.0}),
        Setting("gaussian σ=0.05", {"mechanism": "gaussian", "sigma": 0.05}),
        Setting("round, 1 decimal", {"mechanism": "round", "decimals": 1}),
        Setting("reverse sigmoid", {"mechanism": "reverse_sigmoid"}),
        Setting("label only", {"mechanism": "label_only"}),  # what the label alone leaks
    ]
    for cuts, ranked in (((), None), ((0.5,), None), ((0.5,), 1), ((0.5,), 0), ((0.9,), 1)):
        levels = calibrated_levels(*calibration, cuts)
        text = "/".join(f"{c:g}" for c in cuts) or "one bin"
        section: dict[str, Any] = {"mechanism": "bins", "cuts": list(cuts), "confidences": levels}
        if ranked is not None:
            section["ranked"] = ranked
            text += f", ranked {ranked}"
        found.append(Setting(f"bins {text}", section))
    return found


def calibrated_levels(scores: np.ndarray, y: np.ndarray, cuts: tuple[float, ...]) -> list[float]:
    """Histogram binning: the accuracy of the calibration rows in each bin (the bin's
    mean top probability where it holds too few rows: 10)."""
    top = scores.max(axis=1)
    right = scores.argmax(axis=1) == y
    which = np.searchsorted(np.asarray(cuts), top, side="right")
    levels = []
    for b in range(len(cuts) + 1):
        inside = which == b
        lo = cuts[b - 1] if b else 1.0 / scores.shape[1]
        value = right[inside].mean() if inside.sum() >= 10 else top[inside].mean()
        if not inside.any():
            value = (lo + (cuts[b] if b < len(cuts) else 1.0)) / 2
        levels.append(round(float(np.clip(value, 1e-3, 1.0)), 3))
    return levels


# -- utility --------------------------------------------------------------------------


def ece(scores: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    top = scores.max(axis=1)
    right = scores.argmax(axis=1) == y
    which = np.minimum((top * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(right[inside].mean() - top[inside].mean())
    return total / len(y)


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(len(values))
    _, groups, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(groups, weights=ranked)
    return (sums / counts)[groups]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ (Pearson of the ranks); 0 when either side is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def top2(released: np.ndarray, truth: np.ndarray) -> float:
    first = np.argsort(-released, axis=1, kind="stable")[:, :2]
    second = np.argsort(-truth, axis=1, kind="stable")[:, :2]
    return float(np.mean(np.all(first == second, axis=1)))


def utility(released: np.ndarray, truth: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(np.mean(released.argmax(axis=1) == y)),
        "l1": float(np.mean(np.abs(released - truth).sum(axis=1))),
        "ece": ece(released, y),
        "top2": top2(released, truth),
        "confidence_spearman": spearman(released.max(axis=1), truth.max(axis=1)),
    }


# -- membership ------------------------------------------------------------------------


def held_out_advantage(scores: np.ndarray, member: np.ndarray) -> float:
    """``measure_privacy``'s estimate: threshold on one half, TPR − FPR on the other."""
    from tests.benchmarks.measure_privacy import advantage

    return advantage(scores, member)[0]


def membership(
    answers: Any, data: MembershipData, references: list[LiraReference]
) -> dict[str, float]:
    loss = log_likelihood(answers, data.y)
    curve = roc(loss, data.member)
    right = answers.labels == data.y
    result = {
        "loss_advantage": curve.advantage,
        "loss_advantage_held_out": held_out_advantage(loss, data.member),
        "loss_tpr_low": curve.tpr_at(LOW_FPR),
        "label_floor": float(right[data.member].mean() - right[~data.member].mean()),
    }
    if references:  # each set of shadows ranks records differently: the mean over sets
        curves = [roc(r.score(answers, data.y), data.member) for r in references]
        result |= {
            "lira_tpr_low": float(np.mean([c.tpr_at(LOW_FPR) for c in curves])),
            "lira_tpr_1pct": float(np.mean([c.tpr_at(0.01) for c in curves])),
            "lira_auc": float(np.mean([c.auc for c in curves])),
        }
    return result


# -- one model ---------------------------------------------------------------------------


def records(name: str) -> MembershipData:
    split = load_split(name)
    x = np.concatenate([flat(split.x_members), flat(split.x_nonmembers)]).astype(np.float64)
    empty = np.zeros((0, x.shape[1]))
    return MembershipData(
        x=x,
        y=np.concatenate([split.y_members, split.y_nonmembers]),
        member=np.arange(len(x)) < len(split.x_members),
        x_attacker=empty,
        y_attacker=np.zeros(0, dtype=np.int64),
    )


def shadow_recipe(name: str) -> Any:
    from guard.attacks.suite import _shadow_recipe

    return _shadow_recipe(name)


def batch_size(name: str) -> int:
    """Rows per request: 256, or fewer where the default policy's ``validate`` caps the
    batch (shapes: 128 images)."""
    default = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    caps = [
        s["validate"].get("max_batch", 256)
        for s in default["models"][name]["stages"]
        if "validate" in s
    ]
    return min([256, *caps])


def policy(directory: Path, plan: dict[str, tuple[str, Setting]]) -> Path:
    """Every setting as a model of its own: ``validate`` of the default, then ``privacy``."""
    default = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    models = {}
    for served, (name, setting) in plan.items():
        section = copy.deepcopy(default["models"][name])
        validate = [s for s in section["stages"] if "validate" in s]
        privacy = [{"privacy": setting.privacy}] if setting.privacy else []
        section["stages"] = validate + privacy
        models[served] = section
    document = {**default, "models": models}
    base = directory / "base.yaml"
    base.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return measurement_policy(directory, [CLIENT], base=base)


def measure(models: list[str], shadows: int, repeats: int) -> dict[str, Any]:
    plan: dict[str, tuple[str, Setting]] = {}
    prepared: dict[str, Any] = {}
    lira = installed("sklearn")
    for name in models:
        data = records(name)
        truth = onnx_target(name).query(data.x).scores
        held = np.flatnonzero(~data.member)
        order = np.random.default_rng([SEED, 1]).permutation(len(held))
        calibrate, evaluate = held[order[: len(held) // 2]], held[order[len(held) // 2 :]]
        started = time.perf_counter()
        references = [
            LiraReference.fit(
                data,
                int(truth.shape[1]),
                shadow_recipe(name),
                np.random.default_rng([SEED, 2, k]),
                shadows=shadows,
            )
            for k in range(repeats if lira else 0)
        ]
        fitted = time.perf_counter() - started
        found = settings(name, (truth[calibrate], data.y[calibrate]))
        prepared[name] = (data, truth, evaluate, references, found, fitted)
        for i, setting in enumerate(found):
            plan[f"{name}-{i}"] = (name, setting)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="measure-privacy-") as folder:
        path = policy(Path(folder), plan)
        with InProcessGuard(path) as guard:
            for name in models:
                data, truth, evaluate, references, found, fitted = prepared[name]
                spec = TargetSpec.builtin(name)
                rows = []
                for i, setting in enumerate(found):
                    target = http_target(
                        guard.url,
                        f"{name}-{i}",
                        name,
                        spec=spec,
                        api_key=api_key(CLIENT),
                        batch_size=batch_size(name),
                    )
                    with target:
                        answers = target.query(data.x)
                    if not answers.answered.all():
                        raise RuntimeError(f"{name} {setting.label}: the guard refused answers")
                    row = {"setting": setting.label, "privacy": setting.privacy}
                    row |= utility(answers.scores[evaluate], truth[evaluate], data.y[evaluate])
                    row |= membership(answers, data, references)
                    rows.append(row)
                results[name] = {
                    "settings": rows,
                    "members": int(data.member.sum()),
                    "non_members": int((~data.member).sum()),
                    "shadows": shadows if references else 0,
                    "shadow_sets": len(references),
                    "shadow_seconds": round(fitted, 1),
                }
    return results


# -- label-only membership against the whole default policy ----------------------------


def label_only_through_guard(name: str, records: int) -> list[dict[str, Any]]:
    """Choquette-Choo et al.'s attack (51 queries per record, one request each) through
    the full default policy, with its quotas and with them raised (detection alone),
    beside the same attack on the bare model. Refused records rank as non-members."""
    rows = []
    data = membership_data(name, np.random.default_rng([SEED, 3]), size=records)
    data = dataclasses.replace(data, x=flat(data.x), x_attacker=flat(data.x_attacker))
    bare = label_only_attack(onnx_target(name), data, np.random.default_rng([SEED, 4]))
    rows.append({"policy": "bare model", "advantage": bare.roc.advantage, "auc": bare.roc.auc})
    for quotas in (True, False):
        with tempfile.TemporaryDirectory(prefix="measure-label-only-") as folder:
            path = measurement_policy(
                Path(folder), [CLIENT], raise_quotas=not quotas, models=[name]
            )
            with InProcessGuard(path) as guard:
                spec = TargetSpec.builtin(name)
                target = http_target(
                    guard.url,
                    name,
                    name,
                    spec=spec,
                    api_key=api_key(CLIENT),
                    batch_size=51,
                    trace=CLIENT,
                )
                with target:
                    run = label_only_attack(target, data, np.random.default_rng([SEED, 4]))
                trail = guard.audit()
        ids = [f"{CLIENT}-{i}" for i in range(target.requests)]
        findings = trail.of_client(CLIENT)
        rows.append(
            {
                "policy": "default" if quotas else "default, quotas raised",
                "advantage": run.roc.advantage,
                "auc": run.roc.auc,
                "records": len(data.x),
                "refused_rows": float(target.log.refused().mean()),
                "first_finding_record": trail.first_caught(ids),
                "first_harmful_record": trail.first_caught(ids, harmful=True),
                "stages": sorted({f.stage for f in findings}),
            }
        )
    return rows


def label_only_table(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Label-only membership (51 queries per record), {name}:",
        "",
        "| policy | advantage | AUC | rows refused | first finding (record) | "
        "first harmful (record) | stages |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['advantage']:.3f} | {r['auc']:.3f} | "
            f"{r.get('refused_rows', 0.0):.1%} | {r.get('first_finding_record', '-')} | "
            f"{r.get('first_harmful_record', '-')} | {', '.join(r.get('stages', [])) or '-'} |"
        )
    return "\n".join(lines)


# -- report -----------------------------------------------------------------------------


def table(name: str, result: dict[str, Any]) -> str:
    rows = result["settings"]
    base = rows[0]["accuracy"]
    lines = [
        f"### {name} ({result['members']} members / {result['non_members']} non-members; "
        f"LiRA: mean of {result['shadow_sets']} sets of {result['shadows']} shadows)",
        "",
        "| setting | acc. | L1 | ECE | top-2 | conf. ρ | loss adv. (held-out) | "
        "LiRA TPR@0.1% | @1% | LiRA AUC | floor | meets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        meets = (
            r["loss_advantage"] <= 0.02
            and r.get("lira_tpr_low", 0.0) <= 2 * CHANCE
            and base - r["accuracy"] <= 0.01
            and r["l1"] <= 0.2
        )
        lira = (
            f"{r['lira_tpr_low']:.4f} | {r['lira_tpr_1pct']:.3f} | {r['lira_auc']:.3f}"
            if "lira_tpr_low" in r
            else "— | — | —"
        )
        lines.append(
            f"| {r['setting']} | {r['accuracy']:.3f} | {r['l1']:.3f} | {r['ece']:.3f} | "
            f"{r['top2']:.3f} | {r['confidence_spearman']:.3f} | {r['loss_advantage']:.3f} "
            f"({r['loss_advantage_held_out']:.3f}) | {lira} | {r['label_floor']:.3f} | "
            f"{'yes' if meets else 'no'} |"
        )
    bins = [r for r in rows if r["privacy"] and r["privacy"]["mechanism"] == "bins"]
    lines += ["", "Calibrated levels (first half of the held-out rows):"]
    lines += [f"- {r['setting']}: confidences {r['privacy']['confidences']}" for r in bins]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["digits", "breast_cancer"], choices=MODELS)
    parser.add_argument("--shadows", type=int, default=16, help="LiRA shadow models per set")
    parser.add_argument("--sets", type=int, default=3, help="LiRA shadow sets (results averaged)")
    parser.add_argument(
        "--label-only",
        type=int,
        default=100,
        metavar="K",
        help="label-only attack on K members and K non-members through the default policy "
        "(0: skip)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not installed("sklearn"):
        print("scikit-learn is not installed: LiRA is left out (pip install '.[attacks]')")
    started = time.perf_counter()
    results = measure(args.models, args.shadows, args.sets)
    for name, result in results.items():
        print(f"\n{table(name, result)}\n")
        if args.label_only:
            result["label_only"] = label_only_through_guard(name, args.label_only)
            print(f"{label_only_table(name, result['label_only'])}\n")
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
