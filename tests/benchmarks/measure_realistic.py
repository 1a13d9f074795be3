"""Issue 13's targets, measured end to end through a real guard on a built-in model.

    python tests/benchmarks/measure_realistic.py [--model digits] [--quick] [--policy FILE]
        [--seed 0] [--only benign,priming,evasion,adaptive,extraction] [--json OUT]

``--model`` names a built-in model (default ``digits``; ``shapes`` is the 32x32x3
image model). Attacks work on flat rows; requests carry the model's input shape
(:mod:`tests.benchmarks.model_inputs`). The attacks' radii are the suite's
defaults, fractions of the model's input range: L2 0.625 and L-inf 0.125 of it.

Every phase starts a fresh guard in-process on 127.0.0.1 (a thread; the attack
clients are synchronous HTTP over loopback) from ``--policy`` (default: the
built-in ``guard/policies/default.yaml``), with every ``budget`` stage's quotas
raised so only detection decides, an audit log, and one API key per client
(:func:`guard.attacks.guarded.measurement_policy`). What the guard did is read
from its audit log by request id (a guard may answer a detected client
silently: status 200, no header) and from the HTTP status.

Phases (``--quick`` scale in brackets; quick takes ~3 minutes on a loaded 2-core
machine, full ~3-8; the quick adaptive comparison, on 4 samples, is a smoke test:
quote the full one):

benign      the honest mix (:class:`guard.attacks.benign.TrafficMix`) from
            60 [40] keyed clients x 35 [25] requests: popular inputs (Zipf over
            20), exact retries, jitter, fresh inputs. Requests refused or
            degraded (per category), clients denied, harmed, flagged.
priming     5 accounts send every popular input exactly and jittered, then the
            same honest mix: honest requests refused or degraded.
evasion     HopSkipJump, Square L-inf, SimBA, 10 [3] samples, 500 [150] queries
            each, one key: the query of each run at which the guard first
            recorded a finding (a run won in fewer than 10 queries is listed,
            not held against detection), and the end-to-end success through
            the guard against the same attack on the bare model.
adaptive    OARS-style resampling (HopSkipJump, Square L-inf, SimBA: a wrapper
            adding noise), OARS proper for Square L-inf (the attack resamples
            its own proposals, widened, inside the ball), alone and over 10
            keys, Sybil over
            10 keys, Sybil + OARS, history flushing by 10,000 junk rows from
            other keys every 200 [400] attack queries, and HopSkipJump
            resampling only on refusals (keeps going when degraded to
            label-only), 12 [4] samples, 600 [400] queries each (resends not
            counted in that budget): end-to-end success (the
            final input judged on the bare ONNX model) through the guard against
            the same attack on the bare model, with the real query counts. A
            sample the bare attack wins in fewer than 10 queries is shown but
            left out of PASS/MISS (no query-based detector can stop it).
extraction  Knockoff (1,000 queries) and JbDA (500 queries), 10 [3] runs each, a
            fresh guard per run: runs in which the attacker's key got a finding.

Prints a table of every target with PASS/MISS and the measured value. Numbers
are this run's; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guard.attacks import adaptive, evasion  # noqa: E402
from guard.attacks.benign import TrafficMix, priming_requests  # noqa: E402
from guard.attacks.evasion.base import EvasionRun  # noqa: E402
from guard.attacks.guarded import (  # noqa: E402
    DEFAULT_POLICY,
    AuditTrail,
    InProcessGuard,
    api_key,
    measurement_policy,
)
from guard.attacks.targets import HttpTarget, Target, TargetSpec  # noqa: E402
from tests.benchmarks.model_inputs import (  # noqa: E402
    http_target,
    model_choices,
    onnx_target,
    samples,
)

MODEL = "digits"
SPEC = TargetSpec.builtin(MODEL)
SPAN = float(SPEC.hi - SPEC.lo)
L2, LINF = 0.625 * SPAN, 0.125 * SPAN  # the suite's default radii (10 and 2 on digits)


def use_model(name: str) -> None:
    """Measure built-in model ``name``: its spec and the radii scaled to its input range."""
    global MODEL, SPEC, SPAN, L2, LINF, RADII
    MODEL = name
    SPEC = TargetSpec.builtin(name)
    SPAN = float(SPEC.hi - SPEC.lo)
    L2, LINF = 0.625 * SPAN, 0.125 * SPAN
    RADII = {"hopskipjump": (L2, None), "square-linf": (None, LINF), "simba": (None, None)}


PHASES = ("benign", "priming", "evasion", "adaptive", "extraction")
SYBIL_KEYS = 10
SHORT_RUN = 10  # queries: an evasion run over sooner is not held against detection


@dataclass(frozen=True, kw_only=True, slots=True)
class Scale:
    clients: int
    queries: int  # per benign client
    samples: int  # evasion samples per attack
    budget: int  # evasion queries per sample
    adaptive_samples: int
    adaptive_budget: int
    extraction_runs: int
    flush_every: int = 100  # attack queries between two flushes of 10,000 junk rows
    knockoff: int = 1000
    jbda: int = 500


QUICK = Scale(
    clients=40,
    queries=25,
    samples=3,
    budget=150,
    adaptive_samples=4,
    adaptive_budget=400,
    extraction_runs=3,
    flush_every=400,
)
FULL = Scale(
    clients=60,
    queries=35,
    samples=10,
    budget=500,
    adaptive_samples=12,
    adaptive_budget=600,
    extraction_runs=10,
    flush_every=200,
)


class Phase:
    """A fresh guard for one phase, with its own folder, clients and audit log."""

    def __init__(self, policy: Path, clients: list[str]) -> None:
        self.base = policy
        self.clients = clients
        self._tmp = tempfile.TemporaryDirectory(prefix="measure-")
        self.guard: InProcessGuard | None = None

    def __enter__(self) -> Phase:
        folder = Path(self._tmp.name)
        path = measurement_policy(folder, self.clients, base=self.base, models=[MODEL])
        self.guard = InProcessGuard(path).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.guard is not None:
            self.guard.__exit__(*exc)
        self._tmp.cleanup()

    def target(self, client: str) -> HttpTarget:
        assert self.guard is not None
        return http_target(
            self.guard.url, MODEL, MODEL, spec=SPEC, api_key=api_key(client), trace=client
        )

    def audit(self) -> AuditTrail:
        assert self.guard is not None
        return self.guard.audit()


@contextmanager
def targets(phase: Phase, names: list[str]) -> Iterator[list[HttpTarget]]:
    made = [phase.target(n) for n in names]
    try:
        yield made
    finally:
        for t in made:
            t.close()


def rng_for(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([seed, *tags])


# ---------------------------------------------------------------- honest traffic


def honest(policy: Path, scale: Scale, seed: int, *, priming: bool) -> dict[str, Any]:
    x, y = samples(MODEL)
    mix = TrafficMix(queries=scale.queries)
    names = [f"user-{i}" for i in range(scale.clients)]
    primers = [f"primer-{a}" for a in range(5)] if priming else []
    with Phase(policy, names + primers) as phase, targets(phase, names + primers) as made:
        clients = list(zip(names, made[: len(names)], strict=True))
        before = []
        if priming:
            plans = priming_requests(mix, x, y, SPEC, rng_for(seed, 2), mix_rng=rng_for(seed, 1))
            before = list(zip(zip(primers, made[len(names) :], strict=True), plans, strict=True))
        run = mix.run(clients, x, y, rng_for(seed, 1), before=before)
        measured = run.measure(phase.audit())
        assert phase.guard is not None
        measured["stage_microseconds"] = {
            stage: round(1e6 * s, 1) for stage, s in phase.guard.stage_seconds().items()
        }
    measured["seconds"] = round(run.seconds, 1)
    return measured


# ---------------------------------------------------------------- evasion


ATTACKS: dict[str, Callable[[], Any]] = {
    "hopskipjump": lambda: evasion.HopSkipJump(epsilon=L2),
    "square-linf": lambda: evasion.SquareLinf(epsilon=LINF),
    "simba": lambda: evasion.SimBA(epsilon=LINF),
}
RADII = {"hopskipjump": (L2, None), "square-linf": (None, LINF), "simba": (None, None)}


def sample_rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` held-out samples the bare model classifies correctly (attackable); a
    smaller ``n`` takes a prefix of a larger one's."""
    x, y = samples(MODEL)
    right = onnx_target(MODEL).query(x).labels == y
    rows = rng_for(seed, 100).permutation(np.flatnonzero(right))[:n]
    return x[rows].astype(np.float64), y[rows]


def first_findings(run: EvasionRun, target: Target, audit: AuditTrail) -> list[int | None]:
    """Per attacked sample: the 1-based query of its first finding in the audit log
    (or its first detecting status/verdict, for a guard without an audit log)."""
    out = []
    for start, end in run.spans:
        ids = target.log.request_ids[start:end]
        first = audit.first_caught(ids)
        if first is None:
            hits = target.log.detected(start, end)
            first = int(np.argmax(hits)) + 1 if hits.any() else None
        out.append(first)
    return out


def evasion_phase(policy: Path, scale: Scale, seed: int) -> dict[str, Any]:
    x, y = sample_rows(seed, scale.samples)
    out = {}
    for k, name in enumerate(ATTACKS):
        with Phase(policy, ["attacker"]) as phase, targets(phase, ["attacker"]) as (target,):
            run = evasion.run_evasion(
                ATTACKS[name](), target, x, y, budget=scale.budget, rng=rng_for(seed, 10 + k)
            )
            firsts = first_findings(run, target, phase.audit())
        bare_run = evasion.run_evasion(
            ATTACKS[name](),
            onnx_target(MODEL),
            x,
            y,
            budget=scale.budget,
            rng=rng_for(seed, 10 + k),
        )
        attacked = run.attacked
        out[name] = {
            "runs": len(attacked),
            "first_finding": firsts,
            "queries": [s.queries for s in attacked],
            "succeeded": [s.success for s in attacked],  # as the attacker saw it
            "success_guard": float(np.mean(_evaluate(run, x, y, name))),
            "success_bare": float(np.mean(_evaluate(bare_run, x, y, name))),
        }
    return out


# ---------------------------------------------------------------- adaptive


def _evaluate(run: EvasionRun, x: np.ndarray, y: np.ndarray, name: str) -> list[bool]:
    """Per sample (all of them: one whose clean query was refused was not won), whether
    the attack's final input fools the bare model within the attack's radius."""
    bare = onnx_target(MODEL)
    l2, linf = RADII[name]
    return [
        adaptive.judge_on(bare, x[s.index], s.label, s.x_adv, l2=l2, linf=linf).success
        for s in run.samples
    ]


def adaptive_phase(
    policy: Path, scale: Scale, seed: int, kinds: set[str] | None = None
) -> dict[str, Any]:
    x, y = sample_rows(seed, scale.adaptive_samples)
    budget = scale.adaptive_budget
    scenarios = [
        ("oars", "hopskipjump"),
        ("oars", "square-linf"),
        ("oars", "simba"),
        ("resampling", "square-linf"),
        ("sybil", "hopskipjump"),
        ("sybil", "square-linf"),
        ("sybil+oars", "square-linf"),
        ("sybil+resampling", "square-linf"),
        ("flushing", "square-linf"),
        ("labelonly", "hopskipjump"),
    ]

    def make_attack(kind: str, name: str) -> Any:
        if kind.endswith("resampling"):  # OARS proper: the attack resamples its proposals
            return adaptive.ResamplingSquareLinf(epsilon=LINF)
        return ATTACKS[name]()

    def wrap(kind: str, t: list[Target], r: np.random.Generator) -> Target:
        if kind == "sybil+oars":
            return adaptive.Resampling(adaptive.Sybil(t), r)
        if kind == "sybil+resampling":
            return adaptive.Sybil(t)
        return adaptive.wrap(kind, t, r, flush_every=scale.flush_every)

    out = {}
    for k, (kind, name) in enumerate(scenarios):
        if kinds is not None and kind not in kinds:
            continue
        label = f"{kind} {name}"
        keys = adaptive.accounts_needed(kind.split("+")[0], sybil_keys=SYBIL_KEYS)
        started = time.perf_counter()
        # without the guard: the same wrapper over bare models (never refuses)
        bare_targets: list[Target] = [onnx_target(MODEL) for _ in range(keys)]
        bare = wrap(kind, bare_targets, rng_for(seed, 40 + k, 1))
        bare_run = evasion.run_evasion(
            make_attack(kind, name), bare, x, y, budget=budget, rng=rng_for(seed, 40 + k)
        )
        bare_success = _evaluate(bare_run, x, y, name)
        bare_real = adaptive.real_queries(bare)
        names = [f"{kind}-{i}" for i in range(keys)]
        with Phase(policy, names) as phase, targets(phase, names) as made:
            through = wrap(kind, list(made), rng_for(seed, 40 + k, 1))
            run = evasion.run_evasion(
                make_attack(kind, name), through, x, y, budget=budget, rng=rng_for(seed, 40 + k)
            )
            audit = phase.audit()
            real = adaptive.real_queries(through)
            answered = float(np.mean(np.asarray(through.log.status) == 200))
            caught = sum(1 for n in names if any(f.harmful for f in audit.of_client(n)))
        success = _evaluate(run, x, y, name)
        # samples the bare attack wins within SHORT_RUN queries: no query-based detector
        # can stop those; the target is judged without them (and shown with them)
        trivial = [
            w and s.success_query is not None and s.success_query < SHORT_RUN
            for s, w in zip(bare_run.samples, bare_success, strict=True)
        ]
        hard = [i for i, t in enumerate(trivial) if not t]
        out[label] = {
            "samples_bare": len(bare_success),
            "success_bare": float(np.mean(bare_success)) if bare_success else None,
            "samples_guard": len(success),
            "success_guard": float(np.mean(success)) if success else None,
            "trivial_samples": sum(trivial),
            "success_bare_hard": float(np.mean([bare_success[i] for i in hard])) if hard else None,
            "success_guard_hard": float(np.mean([success[i] for i in hard])) if hard else None,
            "queries_bare": bare_real,
            "queries_guard": real,
            "budget_per_sample": budget,
            "keys_acted_on": f"{caught}/{keys}",
            "resent": getattr(through, "resent", None),
            "answered_fraction": round(answered, 3),  # of the attack's queries, after resends
            # per sample through the guard: won (on the bare model), attack queries spent
            "won_at": [s.queries if w else None for s, w in zip(run.samples, success, strict=True)],
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"    {label}: {out[label]['seconds']} s", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- extraction


def extraction_phase(policy: Path, scale: Scale, seed: int) -> dict[str, Any]:
    from guard.attacks.extraction import Evaluation, JbDA, Knockoff

    x, y = samples(MODEL)
    reference = onnx_target(MODEL)
    out: dict[str, Any] = {}
    for name, budget in (("knockoff", scale.knockoff), ("jbda", scale.jbda)):
        firsts: list[int | None] = []
        fidelity = []
        for r in range(scale.extraction_runs):
            rng = rng_for(seed, 70 + (name == "jbda"), r)
            order = rng.permutation(len(x))
            pool, held = order[: len(x) // 2], order[len(x) // 2 :]
            evaluation = Evaluation.of(reference, x[held], y[held])
            with Phase(policy, ["thief"]) as phase, targets(phase, ["thief"]) as (target,):
                attack: Knockoff | JbDA = (
                    Knockoff(budgets=(budget,), steps=200)
                    if name == "knockoff"
                    else JbDA(budget=budget, seed_size=50, steps=200)
                )
                result = attack.run(target, x[pool], evaluation, rng)
                firsts.append(phase.audit().first_caught(target.log.request_ids))
            fidelity.append(result.curve[-1].fidelity if result.curve else 0.0)
        out[name] = {
            "runs": len(firsts),
            "first_finding": firsts,
            "budget": budget,
            "fidelity": [round(f, 3) for f in fidelity],
        }
    return out


# ---------------------------------------------------------------- report


def pct(a: float | None) -> str:
    return "-" if a is None else f"{100 * a:.1f}%"


def targets_table(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    if "benign" in results:
        b = results["benign"]
        a = b["all"]
        share = (a["refused"] + a["degraded"]) / a["requests"]
        cats = ", ".join(
            f"{c} {pct(b[c]['harmed_fraction'])}" for c in ("popular", "retry", "jitter", "fresh")
        )
        rows.append(
            (
                f"honest mix ({b['clients']} clients, {a['requests']} requests): "
                "<= 0.1% refused or degraded",
                f"{pct(share)} ({a['refused']} refused, {a['degraded']} degraded; {cats})",
                share <= 0.001,
            )
        )
        rows.append(
            (
                "honest mix: 0 clients denied",
                f"{b['clients_denied']}/{b['clients']} denied, {b['clients_harmed']} harmed, "
                f"{b['clients_flagged']} flagged",
                b["clients_denied"] == 0,
            )
        )
    if "priming" in results:
        p = results["priming"]
        a = p["all"]
        rows.append(
            (
                "priming by 5 accounts: 0 honest requests refused",
                f"{a['refused']} refused, {a['degraded']} degraded of {a['requests']}; primed inputs "
                f"refused {p['primed_inputs_refused']}/{p['primed_requests']}",
                a["refused"] == 0,
            )
        )
    for name, e in results.get("evasion", {}).items():
        firsts, queries = e["first_finding"], e["queries"]
        # a run that ended (won) within SHORT_RUN queries gives no detector a chance
        short = [q for f, q in zip(firsts, queries, strict=True) if f is None and q < SHORT_RUN]
        judged = [
            f for f, q in zip(firsts, queries, strict=True) if f is not None or q >= SHORT_RUN
        ]
        ok = bool(judged) and all(f is not None and f <= 100 for f in judged)
        note = f"; {len(short)} run(s) over in {short} queries, uncaught" if short else ""
        rows.append(
            (
                f"{name}: every run caught within 100 queries",
                f"first finding at {firsts} (runs {e['runs']}){note}; end-to-end success "
                f"{pct(e['success_guard'])} through the guard vs {pct(e['success_bare'])} without",
                ok,
            )
        )
    for label, e in results.get("adaptive", {}).items():
        bare, guard = e["success_bare"], e["success_guard"]
        hard_bare, hard_guard = e["success_bare_hard"], e["success_guard_hard"]
        ok = None if not hard_bare else (hard_guard or 0.0) <= 0.1 * hard_bare
        trivial = e["trivial_samples"]
        judged = (
            f"; without the {trivial} sample(s) won in < {SHORT_RUN} queries: "
            f"{pct(hard_guard)} vs {pct(hard_bare)}"
            if trivial
            else ""
        )
        targeted = ("oars", "resampling", "sybil", "sybil+oars", "sybil+resampling")
        extra = "" if label.split()[0] in targeted else " (extra)"
        rows.append(
            (
                f"{label}{extra}: success through guard <= 10% of without",
                f"{pct(guard)} vs {pct(bare)} without ({e['samples_guard']} samples, won after "
                f"{[q for q in e['won_at'] if q is not None]} queries; real queries "
                f"{e['queries_guard']} vs {e['queries_bare']}; "
                f"{pct(e['answered_fraction'])} answered; keys acted on {e['keys_acted_on']})"
                + judged,
                ok,
            )
        )
    if "benign" in results:
        cost = results["benign"].get("stage_microseconds", {})
        rows.append(
            (
                "detector cost within the per-detector budget (honest mix, mean per request)",
                ", ".join(f"{k} {v:.0f} µs" for k, v in cost.items()) or "-",
                None,
            )
        )
    ex = results.get("extraction", {})
    benign_flagged = None
    if "benign" in results:
        benign_flagged = results["benign"]["clients_flagged"] / results["benign"]["clients"]
    for name, need in (("knockoff", 0.95), ("jbda", 0.95)):
        if name not in ex:
            continue
        e = ex[name]
        caught = sum(1 for f in e["first_finding"] if f is not None and f <= e["budget"])
        share = caught / e["runs"] if e["runs"] else 0.0
        ok = share >= need
        note = ""
        if name == "knockoff":
            note = f"; benign clients flagged {pct(benign_flagged)}"
            ok = ok and benign_flagged is not None and benign_flagged <= 0.005
        rows.append(
            (
                f"{name}: caught in >= 95% of runs within {e['budget']} queries"
                + (" at <= 0.5% benign clients flagged" if name == "knockoff" else ""),
                f"{caught}/{e['runs']} runs, first finding {e['first_finding']}{note}; "
                f"fidelity {e['fidelity']}",
                ok,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="digits", choices=model_choices(), help="built-in model (digits)"
    )
    parser.add_argument("--quick", action="store_true", help="small scale (2-3 minutes)")
    parser.add_argument("--policy", type=Path, default=DEFAULT_POLICY)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(PHASES))
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument(
        "--adaptive-kinds",
        help="adaptive attackers to run, comma-separated: oars, resampling, sybil, sybil+oars, "
        "sybil+resampling, flushing, labelonly (default: all)",
    )
    for field in dataclasses.fields(Scale):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=int,
            help=f"override the scale's {field.name} (quick {getattr(QUICK, field.name)}, "
            f"full {getattr(FULL, field.name)})",
        )
    args = parser.parse_args(argv)
    use_model(args.model)
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; expected some of {', '.join(PHASES)}")
    kinds = {k.strip() for k in args.adaptive_kinds.split(",")} if args.adaptive_kinds else None
    scale = QUICK if args.quick else FULL
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Scale)
        if getattr(args, f.name) is not None
    }
    if any(v < 1 for v in overrides.values()):
        parser.error(f"scale overrides must be >= 1; got {overrides}")
    scale = dataclasses.replace(scale, **overrides)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    runners: dict[str, Callable[[], Any]] = {
        "benign": lambda: honest(args.policy, scale, args.seed, priming=False),
        "priming": lambda: honest(args.policy, scale, args.seed, priming=True),
        "evasion": lambda: evasion_phase(args.policy, scale, args.seed),
        "adaptive": lambda: adaptive_phase(args.policy, scale, args.seed, kinds),
        "extraction": lambda: extraction_phase(args.policy, scale, args.seed),
    }
    results: dict[str, Any] = {}
    timings = {}
    for name in phases:
        started = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = runners[name]()
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"  {name}: {timings[name]} s", file=sys.stderr, flush=True)
    rows = targets_table(results)
    print(
        f"\n### {args.model}, {args.policy} ({'quick' if args.quick else 'full'}, "
        f"seed {args.seed})\n"
    )
    print(f"scale: {scale}\n")
    print("| target | measured | |")
    print("|---|---|---|")
    for target, measured, ok in rows:
        print(f"| {target} | {measured} | {'-' if ok is None else 'PASS' if ok else 'MISS'} |")
    print(f"\nseconds per phase: {timings}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "scale": vars(args) | {"scale": str(scale)},
                    "results": results,
                    "seconds": timings,
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
