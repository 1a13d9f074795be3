"""The tuning report: markdown tables of every candidate and a Pareto-front plot.

The plot (``<report stem>.png`` beside the report, when matplotlib is
installed) has one panel per constrained measure (false-positive rate, added
latency, and score change or accuracy loss): risk against that measure for
every candidate, the bound as a dashed line, the Pareto front of the
candidates (none both safer and cheaper) joined, and the chosen one circled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from guard.tuning.measure import BenignOutcome
from guard.tuning.policyfile import attack_line, constraint_text, shown, summary_lines
from guard.tuning.search import TuneResult


def markdown(result: TuneResult, *, base_path: Path, plot: Path | None) -> str:
    w = result.workload
    lines = [
        f"# Tuning `{result.model}`: {base_path}",
        "",
        f"Budget `{w.name}`, seed {result.seed}, {len(result.candidates)} candidates measured "
        f"in {result.seconds:.0f} s. Constraints: {constraint_text(result)}; risk tolerance "
        f"{result.tolerance:.3f}, cost tolerance {result.cost_tolerance:.3f}{_noise(result)}.",
        "",
        f"Traffic per candidate: {w.benign_clients} benign clients x {w.benign_queries} queries "
        f"(honest traffic over held-out rows of {result.data}: popular inputs, exact "
        "retries, jittered copies and fresh rows, one row per request), then "
        f"{', '.join(result.attacks) or 'no attack'}, each against a fresh guard of its own "
        "(all on loopback, in-process).",
        "",
        "## Chosen",
        "",
        *(f"- {line}" for line in summary_lines(result)),
        "",
        "| parameter | base | chosen | grid |",
        "|---|---|---|---|",
        *(
            f"| `{p.name}` | {_cell(p.base)} | {_cell(result.chosen.values[p.name])} | "
            f"{', '.join(_cell(v) for v in p.values)} |"
            for p in result.params
        ),
    ]
    if result.chosen.calibrated:
        value, inputs = result.chosen.calibrated["squeeze_detect.threshold"]
        lines.append(
            f"| `squeeze_detect.threshold` | | {value:g} | calibrated on {inputs} inputs |"
        )
    lines += ["", "## Attacks: bare model, base policy, chosen policy", ""]
    lines += ["| attack | bare model | base policy | chosen policy |", "|---|---|---|---|"]
    for name in result.attacks:
        bare = result.baseline.attacks[name]
        row = [f"success {bare.success:.3f}"]
        for c in (result.base, result.chosen):
            row.append(attack_line(c.measurement.attack(name)) if c.measurement else "-")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "## Every candidate", "", *_candidates(result)]
    if plot is not None:
        lines += ["", f"![risk against each constrained measure]({plot.name})"]
    lines += [
        "",
        "Risk: per attack, the gain made before being caught as a share of the bare "
        "model's, averaged. FP: benign queries a detector fired on (95% upper bound in the "
        "summary). Latency: mean time per request in the policy's stages.",
        "",
    ]
    return "\n".join(lines)


def _noise(result: TuneResult) -> str:
    if not result.noise:
        return ""
    draws = ", ".join(f"{r:.3f}" for r in result.noise)
    return f" (from the base policy measured with three seeds; its risk: {draws})"


def _candidates(result: TuneResult) -> list[str]:
    certified = any(p.group == "certified" for p in result.params)
    head = "| # | settings | FP | acc. loss | ms | score L1 | risk |"
    rule = "|---:|---|---:|---:|---:|---:|---:|"
    if certified:
        head, rule = head + " ACR |", rule + "---:|"
    rows = [head + " meets constraints |", rule + "---|"]
    for n, c in enumerate(result.candidates, start=1):
        settings = (
            ", ".join(
                f"{p.name}={_cell(c.values[p.name])}"
                for p in result.params
                if c.values[p.name] != result.base.values[p.name]
            )
            or "base policy"
        )
        if c is result.chosen:
            settings = f"**{settings}** (chosen)"
        m = c.measurement
        if m is None:
            rows.append(f"| {n} | {settings} | does not load: {c.error} |")
            continue
        b = m.benign
        cells = [
            f"{b.false_positives}/{b.queries}",
            f"{b.accuracy_loss:+.3f}",
            f"{b.added_ms:.2f}",
            f"{b.score_change:.2f}",
            f"{c.risk:.3f}",
        ]
        if certified:
            cells.append(f"{m.certified.acr:.3f}" if m.certified else "-")
        verdict = "yes" if c.feasible else "no: " + "; ".join(c.violations)
        rows.append(f"| {n} | {settings} | " + " | ".join(cells) + f" | {verdict} |")
    return rows


def _cell(value: Any) -> str:
    return shown(value).replace("|", "\\|")


def plot(result: TuneResult, path: Path) -> Path:
    """Write the Pareto-front figure; raises ImportError without matplotlib."""
    from matplotlib.figure import Figure

    k = result.constraints
    measured = [(c, c.measurement.benign) for c in result.candidates if c.measurement is not None]
    panels: list[tuple[str, Callable[[BenignOutcome], float], float | None]] = [
        ("false-positive rate", lambda b: b.fp_rate, k.max_false_positive),
        ("added latency (ms)", lambda b: b.added_ms, k.max_added_latency_ms),
    ]
    if any(b.score_change > 0 for _, b in measured):
        panels.append(("score change (L1)", lambda b: b.score_change, k.max_score_change))
    else:
        panels.append(("accuracy loss", lambda b: b.accuracy_loss, k.max_accuracy_loss))
    figure = Figure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    figure.suptitle(f"guard tune: {result.model}, {len(measured)} candidates")
    for i, (label, measure, bound) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), i)
        for feasible, colour in ((True, "tab:blue"), (False, "tab:grey")):
            points = [(measure(b), c.risk) for c, b in measured if c.feasible is feasible]
            axes.scatter(
                [x for x, _ in points],
                [y for _, y in points],
                color=colour,
                s=22,
                label="meets constraints" if feasible else "does not",
            )
        front = pareto_front([(measure(b), c.risk) for c, b in measured])
        axes.plot([x for x, _ in front], [y for _, y in front], color="tab:blue", lw=1)
        chosen = result.chosen.measurement
        if chosen is not None:
            axes.scatter(
                [measure(chosen.benign)],
                [result.chosen.risk],
                s=140,
                facecolors="none",
                edgecolors="tab:red",
                label="chosen",
            )
        if bound is not None:
            axes.axvline(bound, color="tab:red", linestyle="--", linewidth=1)
        axes.set(xlabel=label, ylabel="risk (share of the bare model's attack gain)")
        if "score" not in label:
            axes.set_xlim(left=0.0)
        if i == 1:
            axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ``(measure, risk)`` points no other beats on both, by increasing measure."""
    front: list[tuple[float, float]] = []
    for point in sorted(points):
        if not front or point[1] < front[-1][1]:
            front.append(point)
    return front
