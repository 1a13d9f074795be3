"""``guard tune``: a policy whose thresholds were measured against real attacks.

    guard tune --policy base.yaml --model digits --out tuned.yaml --report tuning.md

``--model`` is a model of the policy; ``--data`` its traffic (a .npz, .npy, .csv file
or a folder of images: :mod:`guard.subject`; default: the built-in data set of a
built-in model). Serves candidates of the base policy in-process, sends benign traffic and the
attack suite at each, and writes the candidate that meets the constraints
(:mod:`guard.tuning.search`) with a comment on every tuned number. ``--verify``
measures a policy as it is (a different ``--seed`` re-measures a tuned one) and
exits 1 when it misses a constraint. Progress goes to stderr; without
``--out`` the policy goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "tune",
        help="tune a policy's thresholds against measured attacks",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    from guard.commands.subjectargs import add_subject_arguments

    parser.add_argument("--policy", type=Path, required=True, help="the base policy YAML")
    add_subject_arguments(
        parser,
        policy=False,
        model_help="the model (a key under models:) to tune: its local file, else its upstream",
        data_help="the data its traffic is drawn from: .npz (x, y; optional x_members, "
        "y_members for membership), .npy, .csv, a folder of images, or a built-in name "
        "(default: a built-in model's own)",
    )
    parser.add_argument(
        "--max-false-positive",
        type=float,
        default=0.001,
        metavar="RATE",
        help="largest share of benign requests refused or flagged (default: 0.001)",
    )
    parser.add_argument(
        "--max-accuracy-loss",
        type=float,
        default=0.01,
        metavar="LOSS",
        help="largest drop of benign accuracy against the bare model (default: 0.01)",
    )
    parser.add_argument(
        "--max-added-latency-ms",
        type=float,
        default=2.0,
        metavar="MS",
        help="largest latency the stages may add per request, in ms (default: 2.0)",
    )
    parser.add_argument(
        "--max-score-change",
        type=float,
        metavar="L1",
        help="bound on the mean L1 change of released probabilities (default: none)",
    )
    parser.add_argument(
        "--risk-tolerance",
        type=float,
        help="risks this close to the lowest count as equal and the cheaper wins (default: "
        "measured, from the base policy's risk over three seeds)",
    )
    parser.add_argument(
        "--budget",
        choices=["small", "full"],
        default="small",
        help="traffic and search size: small (minutes) or full (default: small)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the traffic and attacks (default: 0)"
    )
    parser.add_argument("--out", type=Path, help="write the tuned policy here (default: stdout)")
    parser.add_argument("--report", type=Path, help="write a markdown report (and a PNG) here")
    parser.add_argument(
        "--verify", action="store_true", help="measure the policy as it is; exit 1 if it misses"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from guard.commands.subjectargs import print_notes, subject_from_args
    from guard.config import load_policy
    from guard.tuning.search import Constraints, tune
    from guard.tuning.workload import WORKLOADS, Interface, TuneData

    for flag in ("max_false_positive", "max_accuracy_loss", "max_added_latency_ms"):
        if getattr(args, flag) < 0:
            return _fail(f"--{flag.replace('_', '-')} must be >= 0")
    policy = load_policy(args.policy)  # a broken base policy stops here, with its message
    if args.model not in policy.models:
        return _fail(
            f"{args.policy} has no model {args.model!r}; it has {', '.join(policy.models)}"
        )
    subject = subject_from_args(args)  # builtin:<name> names its data set
    print_notes(subject, "tune")
    data = TuneData.of(subject)
    if not data.has_members and "privacy" in {s.kind for s in policy.models[args.model].stages}:
        print(
            "guard tune: note: the data has no member rows (x_members, y_members): the "
            "membership attack is not measured",
            file=sys.stderr,
        )
    constraints = Constraints(
        max_false_positive=args.max_false_positive,
        max_accuracy_loss=args.max_accuracy_loss,
        max_added_latency_ms=args.max_added_latency_ms,
        max_score_change=args.max_score_change,
    )
    from guard.progress import Progress

    bar = Progress("tune", unit=" steps")  # a counter over the progress lines, on a terminal

    def progress(line: str) -> None:
        bar.write(line)
        bar.advance()

    result = tune(
        policy,
        model=args.model,
        data=data,
        workload=WORKLOADS[args.budget],
        constraints=constraints,
        seed=args.seed,
        tolerance=args.risk_tolerance,
        search=not args.verify,
        interface=Interface(
            input=subject.input_name,
            scores=subject.scores_output or "",
            label=subject.label_output or "",
        ),
        progress=progress,
    )
    bar.close()
    if not result.params and not args.verify:
        print(
            f"guard tune: nothing to tune: {args.model} has none of blacklight, prada, "
            "squeeze_detect, privacy (with a tunable mechanism), certify; measured as it is",
            file=sys.stderr,
        )
    if args.report:
        _write_report(result, args.policy, args.report)
    return _verify(result) if args.verify else _write_policy(result, args)


def _verify(result: Any) -> int:
    from guard.tuning.policyfile import constraint_text, summary_lines

    for line in summary_lines(result):
        print(line)
    chosen = result.chosen
    if chosen.feasible:
        print(f"meets its constraints ({constraint_text(result)})")
        return 0
    print(f"misses its constraints: {chosen.error or '; '.join(chosen.violations)}")
    return 1


def _write_policy(result: Any, args: argparse.Namespace) -> int:
    import yaml

    from guard.config import load_policy
    from guard.runtime import build_runtime
    from guard.tuning.policyfile import render

    chosen = result.chosen
    if not chosen.feasible:
        reason = chosen.error or "; ".join(chosen.violations)
        print(
            f"guard tune: no candidate meets the constraints; the closest: {reason}. "
            "Loosen a bound, or widen the search (--budget full).",
            file=sys.stderr,
        )
        return 1
    out = args.out or Path("tuned.yaml")
    document = yaml.safe_load(args.policy.read_text(encoding="utf-8"))  # the base, as written
    text = render(document, result, base_path=args.policy, out_path=out)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.write_text(text, encoding="utf-8")
    build_runtime(load_policy(args.out), session=None)  # what `guard check` does
    print(
        f"tuned policy written to {args.out} (risk {chosen.risk:.3f}, base {result.base.risk:.3f})",
        file=sys.stderr,
    )
    return 0


def _write_report(result: Any, base: Path, path: Path) -> None:
    from guard.extras import hint
    from guard.tuning.report import markdown, plot

    figure: Path | None = path.with_suffix(".png")
    try:
        plot(result, figure)  # type: ignore[arg-type]
    except ImportError:
        print(
            f"guard tune: no plot in the report: it needs matplotlib {hint('matplotlib')}",
            file=sys.stderr,
        )
        figure = None
    path.write_text(markdown(result, base_path=base, plot=figure), encoding="utf-8")
    print(f"report written to {path}", file=sys.stderr)


def _fail(message: str) -> int:
    print(f"guard tune: {message}", file=sys.stderr)
    return 2
