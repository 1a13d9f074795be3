"""Does the certified radius leak what a label-only policy withholds? (issue 21)

    python -m tests.benchmarks.measure_certify_leak [--samples 40] [--budget 300] [--epsilon 16] [--json out.json]

The target is the digits model behind a policy that releases labels only
(``privacy: {mechanism: label_only}``), run through the policy's own pipeline in
this process (the stages' code, no sockets). Four conditions:

``off``        certification off: the attacker sees labels.
``raw``        certification on, the radius released as it was before issue 21
               (every digit: step 1e-6, no label-only rule).
``grid``       certification on, the radius on the default σ/4 grid (no label-only rule).
``policy``     certification on, as the stage now serves a label-only policy: certified
               at one step, or abstained.

The attacker turns each answer into a score for the offline suite: the label
alone is one-hot; with a certificate that agrees with the label, the top class
gets ``Φ(radius/σ)`` (the lower bound on its vote the radius implies) and an
abstention or a disagreeing certificate gets ``Φ(-1)``: a score that falls as
the input nears the boundary, which is what a score-based attack follows.

Attacks: Square L2 (:class:`guard.attacks.evasion.square.SquareL2`; success rate
within ``epsilon`` and ``budget`` queries, ± its binomial standard error), and the
confidence membership attack (Yeom et al., the suite's threshold ROC over that
score of the true class, :func:`guard.attacks.membership.roc`; label-only: the
score is whether the label is right). Everything is seeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from guard.attacks.evasion.base import run_evasion
from guard.attacks.evasion.square import SquareL2
from guard.attacks.membership import membership_data, roc
from guard.attacks.targets import Answers, Target, TargetSpec
from guard.clients import Client
from guard.config import parse_policy
from guard.inference import InferRequest
from guard.models import load_samples
from guard.pipeline import RequestContext
from guard.runtime import build_runtime
from guard.stages.certify import Certify, RadiusGrid

CONDITIONS = ("off", "raw", "grid", "policy")
SIGMA, N, N0 = 0.5, 2000, 50
SECRET = "measure-certify-leak-key"


class LabelOnlyPolicy(Target):
    """The digits model behind a label-only policy, certification as ``condition`` says."""

    def __init__(self, condition: str, *, seed: int = 0) -> None:
        super().__init__(TargetSpec.builtin("digits"), batch_size=1)
        self.condition = condition
        stages: list[dict[str, Any]] = [
            {"validate": {"min": 0.0, "max": 16.0}},
            {"privacy": {"mechanism": "label_only"}},
        ]
        if condition != "off":
            certify = {"sigma": SIGMA, "n": N, "n0": N0, "batch": 1000, "when": "always"}
            stages.append({"certify": {**certify, "seed": seed}})
        document = {
            "version": 1,
            "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        }
        policy = parse_policy(document, source="measure", base=Path.cwd(), environ={})
        self.runtime = build_runtime(policy, session=None)
        model = self.runtime.models["digits"]
        self.pipeline, self.backend = model.pipeline, model.backend
        for stage in self.pipeline.stages:
            if isinstance(stage, Certify) and condition in ("raw", "grid"):
                stage.labels_only = False  # the release before the label-only rule
                if condition == "raw":
                    stage.grid = RadiusGrid(1e-6)  # and before the grid
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.run_until_complete(self.runtime.close())
        self.loop.close()

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        ctx = RequestContext(
            request_id=f"q{self.queries}",
            model="digits",
            client=Client("attacker"),
            request=InferRequest(model_name="digits", inputs={"input": x.astype(np.float32)}),
        )
        response = self.loop.run_until_complete(self.pipeline.run(ctx, self.backend))
        labels = np.asarray(response.outputs["label"], dtype=np.int64).reshape(len(x))
        return Answers(self.scores(labels, response.parameters), labels), 200, ctx.verdict

    def scores(self, labels: np.ndarray, parameters: dict[str, Any]) -> np.ndarray:
        """What the attacker reads from an answer: one-hot, or the radius as confidence."""
        c = self.spec.n_classes
        if "certified_radius" not in parameters:
            return np.eye(c)[labels]
        radii = np.atleast_1d(parameters["certified_radius"]).astype(np.float64)
        certified = np.atleast_1d(parameters["certified_label"]).astype(np.int64)
        z = np.where(certified == labels, radii / SIGMA, -1.0)
        top = norm.cdf(z)
        scores = np.repeat(((1 - top) / (c - 1))[:, None], c, axis=1)
        scores[np.arange(len(labels)), labels] = top
        return scores


def square_success(
    condition: str, x: np.ndarray, y: np.ndarray, *, epsilon: float, budget: int, seed: int
) -> dict[str, float]:
    """Square L2's success rate against ``condition``, with its binomial standard error."""
    with LabelOnlyPolicy(condition, seed=seed) as target:
        run = run_evasion(
            SquareL2(epsilon=epsilon), target, x, y, budget=budget, rng=np.random.default_rng(seed)
        )
    attacked = run.attacked
    wins = sum(s.success for s in attacked)
    rate = wins / len(attacked) if attacked else float("nan")
    return {
        "attacked": len(attacked),
        "success_rate": rate,
        "stderr": math.sqrt(rate * (1 - rate) / max(len(attacked), 1)),
    }


def membership_auc(condition: str, size: int, *, seed: int) -> dict[str, float]:
    """The confidence attack's AUC and best advantage over ``size`` members and non-members."""
    data = membership_data("digits", np.random.default_rng(seed), size=size)
    with LabelOnlyPolicy(condition, seed=seed) as target:
        answers = target.query(data.x)
    rows = np.arange(len(data.y))
    right = answers.labels == data.y
    score = answers.scores[rows, data.y] if condition != "off" else right.astype(float)
    curve = roc(np.where(right, score, -1.0), data.member)
    n = len(data.y) // 2
    return {"records": 2 * n, "auc": curve.auc, "advantage": curve.advantage}


def measure(
    samples: int,
    budget: int,
    epsilon: float,
    members: int,
    seed: int,
    conditions: tuple[str, ...] = CONDITIONS,
    start: int = 0,
) -> dict[str, Any]:
    x, y = load_samples("digits")
    x, y = x[start : start + samples].astype(np.float64), y[start : start + samples]
    results: dict[str, Any] = {}
    for condition in conditions:
        started = time.perf_counter()
        square = square_success(condition, x, y, epsilon=epsilon, budget=budget, seed=seed)
        membership = membership_auc(condition, members, seed=seed)
        results[condition] = {
            "square": square,
            "membership": membership,
            "seconds": round(time.perf_counter() - started, 1),
        }
    return results


def table(results: dict[str, Any], epsilon: float, budget: int) -> str:
    lines = [
        f"| condition | Square L2 success (ε {epsilon:g}, {budget} queries) | "
        "membership AUC | membership advantage |",
        "|---|---|---|---|",
    ]
    for condition, r in results.items():
        s, m = r["square"], r["membership"]
        lines.append(
            f"| {condition} | {s['success_rate']:.2f} ± {s['stderr']:.2f} (n={s['attacked']}) | "
            f"{m['auc']:.3f} | {m['advantage']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40, help="digits attacked by Square")
    parser.add_argument("--budget", type=int, default=300, help="queries per digit")
    parser.add_argument("--epsilon", type=float, default=16.0, help="L2 ball, pixel units")
    parser.add_argument("--members", type=int, default=150, help="members (and non-members)")
    parser.add_argument("--start", type=int, default=0, help="first held-out digit attacked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = measure(
        args.samples,
        args.budget,
        args.epsilon,
        args.members,
        args.seed,
        tuple(args.conditions),
        args.start,
    )
    print(table(results, args.epsilon, args.budget))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
