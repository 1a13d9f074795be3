"""Attack reports: JSON for machines, a table for people, PNG plots when matplotlib is there.

Every entry has at least ``attack``, ``family``, ``unit`` (what one attempt is:
a sample, a record, a class, a run, a query), ``units``, ``success_rate``,
``queries`` (median per unit), ``detected_fraction`` (units with a flag,
degrade, deny or shadow verdict, or a 403/429, on any of their queries),
``first_detection_query`` (median 1-based index of the first such query within
a unit; null when never detected) and ``refused_fraction`` (queries left
unanswered). Family-specific fields follow (norms, fidelity, AUC, similarity,
false-positive rate), then ``params`` and curves.

``success_rate`` per family: evasion, samples misclassified within the goal;
extraction, fidelity at the full budget; membership, balanced accuracy at the
best threshold (``(1 + advantage) / 2``); inversion, classes identified;
benign, null (see ``false_positive_rate``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


class Report:
    def __init__(self, *, model: str, target: str, seed: int) -> None:
        self.model = model
        self.target = target
        self.seed = seed
        self.entries: list[dict[str, Any]] = []
        self.notes: list[str] = []  # what was left out, and why

    def add(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values only: numpy values converted, NaN as null."""
        document: dict[str, Any] = {
            "model": self.model,
            "target": self.target,
            "seed": self.seed,
            "entries": self.entries,
        }
        if self.notes:
            document["notes"] = self.notes
        return _plain(document)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    def table(self) -> str:
        """One row per entry: the shared columns and a family-specific detail."""
        header = (
            "attack",
            "unit",
            "n",
            "success",
            "queries",
            "detected",
            "first det.",
            "refused",
            "detail",
        )
        rows = [header] + [
            (
                e["attack"],
                e["unit"],
                str(e["units"]),
                _num(e["success_rate"]),
                _num(e["queries"], 0),
                _num(e["detected_fraction"]),
                _num(e["first_detection_query"], 0),
                _num(e["refused_fraction"]),
                _detail(e),
            )
            for e in self.entries
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [f"note: {note}" for note in self.notes])

    def plots(self, directory: Path) -> list[Path]:
        """Write ``success_vs_queries.png`` and ``membership_roc.png`` (whichever have data).

        Needs matplotlib (``pip install 'inference-guard[plot]'``); raises ImportError without it.
        """
        from matplotlib.figure import Figure

        directory.mkdir(parents=True, exist_ok=True)
        written = []
        panels = [
            (family, label, [e for e in self.entries if e["family"] == family and "curve" in e])
            for family, label in (
                ("evasion", "success rate (queries per sample)"),
                ("extraction", "fidelity (queries in all)"),
            )
        ]
        panels = [panel for panel in panels if panel[2]]
        if panels:
            figure = Figure(figsize=(5 * len(panels), 4), layout="constrained")
            figure.suptitle(f"{self.model} via {self.target}")
            for k, (family, label, entries) in enumerate(panels, start=1):
                axes = figure.add_subplot(1, len(panels), k)
                for e in entries:
                    rate = e["curve"].get("success_rate") or e["curve"].get("fidelity")
                    axes.plot(e["curve"]["queries"], rate, marker=".", label=e["attack"])
                axes.set(xlabel="queries", ylabel=label, ylim=(0, 1.02), title=family)
                axes.set_xscale("log")
                axes.legend(fontsize="small")
            written.append(directory / "success_vs_queries.png")
            figure.savefig(written[-1], dpi=120)
        rocs = [e for e in self.entries if "roc" in e]
        if rocs:
            figure = Figure(figsize=(4.5, 4.5), layout="constrained")
            axes = figure.add_subplot()
            axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            for e in rocs:
                axes.plot(
                    e["roc"]["fpr"], e["roc"]["tpr"], label=f"{e['attack']} (AUC {e['auc']:.2f})"
                )
            axes.set(
                xlabel="false positive rate",
                ylabel="true positive rate",
                title=f"membership inference, {self.model}",
            )
            axes.legend(fontsize="small")
            written.append(directory / "membership_roc.png")
            figure.savefig(written[-1], dpi=120)
        return written


def _detail(e: dict[str, Any]) -> str:
    family = e["family"]
    if family == "evasion":
        return f"L2 {_num(e['l2'], 2)}  Linf {_num(e['linf'], 2)}  eps {e['params'].get('epsilon')}"
    if family == "extraction":
        return f"fidelity {_num(e['fidelity'])}  accuracy {_num(e['accuracy'])}"
    if family == "membership":
        low = e.get("tpr_at_0.1%_fpr")
        return f"AUC {_num(e['auc'])}  advantage {_num(e['advantage'])}  TPR@0.1%FPR {_num(low)}"
    if family == "inversion":
        return f"similarity {_num(e['similarity'])} vs baseline {_num(e['baseline_similarity'])}"
    if family == "adaptive":
        return (
            f"vs bare {_num(e['bare_success_rate'])}  real queries {e['real_queries']} "
            f"vs {e['bare_real_queries']}  accounts {e['accounts']}"
        )
    if family == "benign":
        return f"false positives {_num(e['false_positive_rate'])}  accuracy {_num(e['accuracy'])}"
    return ""


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as Python values, tuples as lists, NaN as None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
