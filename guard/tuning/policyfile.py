"""Write a tuned policy as YAML, a comment on every tuned number saying what was measured.

:func:`dump` is a small emitter for policy documents (mappings, lists, scalars):
block style for mappings, flow style for short flat lists and mappings, scalars
formatted by PyYAML so quoting is always right, and comments (at the end of a
key's line, or on lines above it) wherever :func:`dump` is given them for a
path. ``yaml.safe_load`` of its output equals the document (tested). The base
policy's own comments are not carried over; relative paths are rewritten for the
output's folder. This is the tuner's one place that writes YAML: the chosen typed
options go into the base document as :func:`guard.stages.options.to_yaml` writes them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from guard.stages.options import format_duration, to_yaml
from guard.tuning.attackers import AttackOutcome
from guard.tuning.search import Candidate, TuneResult
from guard.tuning.space import Param, budget_answers

Path_ = tuple[str | int, ...]
FLOW_WIDTH = 72


def dump(
    document: Any,
    comments: Mapping[Path_, str] | None = None,
    *,
    above: Mapping[Path_, list[str]] | None = None,
    header: list[str] | None = None,
) -> str:
    """``document`` as YAML text: ``comments[path]`` at the end of the line holding the
    key at ``path``, ``above[path]`` as comment lines before it, ``header`` on top."""
    lines = [f"# {line}" if line else "#" for line in header or []]
    notes = _Notes(comments or {}, above or {})
    _node(document, 0, (), lines, notes)
    return "\n".join(lines) + "\n"


class _Notes:
    def __init__(self, inline: Mapping[Path_, str], above: Mapping[Path_, list[str]]) -> None:
        self.inline = inline
        self.above = above

    def end(self, path: Path_) -> str:
        note = self.inline.get(path)
        return f"  # {note}" if note else ""

    def before(self, path: Path_, pad: str) -> list[str]:
        return [f"{pad}# {line}" for line in self.above.get(path, [])]

    def inside(self, path: Path_) -> bool:
        return any(
            len(p) > len(path) and p[: len(path)] == path for p in (*self.inline, *self.above)
        )


def _node(value: Any, indent: int, path: Path_, lines: list[str], notes: _Notes) -> None:
    if isinstance(value, dict):
        _mapping(value, indent, path, lines, notes)
    elif isinstance(value, list):
        _sequence(value, indent, path, lines, notes)
    else:
        lines.append(" " * indent + _flow(value) + notes.end(path))


def _mapping(
    mapping: dict[Any, Any],
    indent: int,
    path: Path_,
    lines: list[str],
    notes: _Notes,
    lead: str = "",
) -> None:
    pad = " " * indent
    for i, (key, value) in enumerate(mapping.items()):
        prefix = lead if i == 0 else " " * len(lead)
        here = (*path, key)
        lines += notes.before(here, pad + " " * len(prefix))
        head = f"{pad}{prefix}{_flow(key)}:"
        if _inline(value, here, notes):
            lines.append(f"{head} {_flow(value)}{notes.end(here)}")
            continue
        lines.append(head + notes.end(here))
        child = indent + len(prefix) + 2
        if isinstance(value, dict):
            _mapping(value, child, here, lines, notes)
        else:
            _sequence(value, child, here, lines, notes)


def _sequence(items: list[Any], indent: int, path: Path_, lines: list[str], notes: _Notes) -> None:
    pad = " " * indent
    for j, item in enumerate(items):
        here = (*path, j)
        if isinstance(item, dict) and item:  # "- key: ...", the key's value inline if short
            _mapping(item, indent, here, lines, notes, lead="- ")
        elif _inline(item, here, notes):
            lines.append(f"{pad}- {_flow(item)}{notes.end(here)}")
        else:
            lines.append(f"{pad}-{notes.end(here)}")
            _sequence(item, indent + 2, here, lines, notes)


def _inline(value: Any, path: Path_, notes: _Notes) -> bool:
    """Scalars, empty containers, and short flat containers nobody comments inside."""
    if not isinstance(value, dict | list) or not value:
        return True
    if notes.inside(path):
        return False
    return _flat(value) and len(_flow(value)) <= FLOW_WIDTH


def _flat(value: Any, depth: int = 0) -> bool:
    children = value.values() if isinstance(value, dict) else value
    for child in children:
        if isinstance(child, dict | list) and (depth >= 1 or not _flat(child, depth + 1)):
            return False
    return True


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


# -- the tuned policy ----------------------------------------------------------------


def tuned_document(document: dict[str, Any], result: TuneResult) -> dict[str, Any]:
    """The base document with the chosen candidate's values set, each as YAML writes it:
    every tuned key, and any other option the candidate changed (a calibrated threshold,
    a privacy budget that follows the noise; in a written section, key by key)."""
    doc = copy.deepcopy(document)
    stages = doc["models"][result.model]["stages"]
    chosen = result.chosen.config.stages if result.chosen.config else result.config.stages
    for index, (base, entry) in enumerate(zip(result.config.stages, chosen, strict=True)):
        tuned = {p.key for p in result.params if p.index == index}
        if tuned or base.options != entry.options:
            if isinstance(stages[index], str):
                stages[index] = {entry.kind: {}}
            written = stages[index][entry.kind] = stages[index][entry.kind] or {}
            _set(written, base.options, entry.options, tuned)
    return doc


def _set(written: dict[str, Any], base: Any, chosen: Any, keys: set[str]) -> None:
    """Write into ``written`` the options of ``chosen`` named in ``keys`` and those that
    differ from ``base``; a nested section already written is updated key by key."""
    for field in dataclasses.fields(chosen):
        old, new = getattr(base, field.name), getattr(chosen, field.name)
        if field.name not in keys and old == new:
            continue
        if (
            field.name not in keys
            and dataclasses.is_dataclass(new)
            and isinstance(written.get(field.name), dict)
        ):
            _set(written[field.name], old, new, set())
        else:
            written[field.name] = to_yaml(chosen, field.name)


def render(document: dict[str, Any], result: TuneResult, *, base_path: Path, out_path: Path) -> str:
    """The tuned policy's text: a header of what was measured, the document, and a
    comment on every tuned number."""
    doc = rebase_paths(tuned_document(document, result), base_path.parent, out_path.parent)
    comments: dict[Path_, str] = {}
    above: dict[Path_, list[str]] = {}
    for param in result.params:
        path = ("models", result.model, "stages", param.index, param.stage, param.key)
        comments[path], above[path] = describe_param(result, param)
    chosen = result.chosen.config.stages if result.chosen.config else ()
    for index, entry in enumerate(chosen):
        stage = ("models", result.model, "stages", index, entry.kind)
        if entry.kind == "squeeze_detect" and result.chosen.calibrated:
            comments[(*stage, "threshold")] = describe_calibrated(result)
        tuned = any(p.stage == "privacy" for p in result.params)
        answers = budget_answers(entry.options) if entry.kind == "privacy" and tuned else None
        if answers is not None:
            per = entry.options.budget.per
            window = f" per {format_duration(per)}" if per else ""
            comments[(*stage, "budget", "epsilon")] = (
                f"follows the noise: {answers:.0f} scored answers per client{window}, "
                "as in the base policy"
            )
    return dump(doc, comments, above=above, header=header_lines(result, base_path))


def header_lines(result: TuneResult, base_path: Path) -> list[str]:
    w = result.workload
    bounds = constraint_text(result)
    draws = ", ".join(f"{r:.3f}" for r in result.noise)
    return [
        f"Tuned by `guard tune` from {base_path} for model {result.model} (data: {result.data}),",
        f"budget {w.name}, seed {result.seed}: {len(result.candidates)} candidates measured "
        f"in {result.seconds:.0f} s. The base policy's comments are not carried over.",
        f"Constraints: {bounds}; risk tolerance {result.tolerance:.3f}"
        + (f" (the base policy's risk over three seeds: {draws})." if draws else "."),
        f"Measured for this policy ({w.benign_clients * w.benign_queries} benign queries from "
        f"{w.benign_clients} clients; each attack against a fresh guard of its own):",
        *(f"  {line}" for line in summary_lines(result)),
        "Each tuned number says what was measured for it; the lines above it, what was",
        "measured for the other values tried (the other tuned numbers as chosen).",
        "",
    ]


def constraint_text(result: TuneResult) -> str:
    k = result.constraints
    parts = [
        f"false positives <= {k.max_false_positive:g}",
        f"accuracy loss <= {k.max_accuracy_loss:g}",
        f"added latency <= {k.max_added_latency_ms:g} ms",
    ]
    if k.max_score_change is not None:
        parts.append(f"score change <= {k.max_score_change:g}")
    return ", ".join(parts)


def rebase_paths(doc: dict[str, Any], base_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Relative file paths of ``doc`` (model files, keys file, audit log) made relative
    to ``out_dir`` instead of ``base_dir``, so the written policy loads where it is."""
    doc = copy.deepcopy(doc)

    def moved(value: Any) -> Any:
        if not isinstance(value, str) or value.startswith("builtin:") or value == "-":
            return value
        if Path(value).is_absolute():
            return value
        return os.path.relpath((base_dir / value).resolve(), out_dir.resolve())

    for entry in (doc.get("models") or {}).values():
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = moved(entry["model"])
    for section, key in (("clients", "keys_file"), ("audit", "path")):
        if isinstance(doc.get(section), dict) and key in doc[section]:
            doc[section][key] = moved(doc[section][key])
    return doc


def describe_param(result: TuneResult, param: Param) -> tuple[str, list[str]]:
    """The comments on a tuned number: at the end of its line, what was measured for the
    chosen value; above it, what was measured for each other value tried with the other
    tuned numbers as chosen (values tried only elsewhere in the search are left out)."""
    chosen = result.chosen.values[param.name]
    base = "kept from the base" if param.base == chosen else f"base {shown(param.base)}"
    end = f"tuned ({base}): measured {_metrics(param, result.chosen)}"
    others = [c for c in result.tried(param) if c.values[param.name] != chosen]
    others.sort(key=lambda c: param.values.index(c.values[param.name]))
    lines = [f"{param.key} {shown(c.values[param.name])}: {_metrics(param, c)}" for c in others]
    return end, lines


def _metrics(param: Param, c: Candidate) -> str:
    m = c.measurement
    if m is None:
        return "does not load"
    if param.group == "certified" and m.certified is not None:
        return f"ACR {m.certified.acr:.3f}, certified accuracy {m.certified.accuracy:.3f}"
    if param.stage == "privacy":
        membership = next((a for a in m.attacks if a.family == "membership"), None)
        advantage = f", membership advantage {membership.success:.3f}" if membership else ""
        return f"score change {m.benign.score_change:.2f}{advantage}, risk {c.risk:.3f}"
    caught = ", ".join(
        f"{a.attack} {a.first_caught or 'never'}" for a in m.attacks if a.family != "membership"
    )
    first = f", first caught at query: {caught}" if caught else ""
    return f"FP {m.benign.false_positives}/{m.benign.queries}, risk {c.risk:.3f}{first}"


def describe_calibrated(result: TuneResult) -> str:
    _, inputs = result.chosen.calibrated["squeeze_detect.threshold"]
    return (
        f"calibrated: at most {result.constraints.max_false_positive / 2:g} (half the bound) "
        f"of {inputs} noisy benign inputs, never sent as traffic, score above it"
    )


def summary_lines(result: TuneResult) -> list[str]:
    """What was measured for the chosen candidate, for the file's header and the report."""
    c = result.chosen
    m = c.measurement
    if m is None:
        return [f"the chosen candidate did not load: {c.error}"]
    b = m.benign
    lines = [
        f"false positives {b.false_positives}/{b.queries} (95% upper bound "
        f"{fp_upper_bound(b.false_positives, b.queries):.4f}), accuracy loss "
        f"{b.accuracy_loss:+.4f}, {b.added_ms:.2f} ms per request in the stages, "
        f"score change L1 {b.score_change:.2f}",
    ]
    for a in m.attacks:
        lines.append(f"{a.attack}: {attack_line(a, result.baseline.attacks[a.attack])}")
    if m.certified is not None:
        t = m.certified
        lines.append(
            f"certified: ACR {t.acr:.3f}, accuracy {t.accuracy:.3f} (loss {t.accuracy_loss:+.3f}), "
            f"abstained {t.abstained:.1%}, {t.ms_per_input:.1f} ms per input"
        )
    lines.append(f"risk {c.risk:.3f} (base policy {result.base.risk:.3f})")
    return lines


def attack_line(a: AttackOutcome, bare: AttackOutcome | None = None) -> str:
    """One attacker's outcome in words, against its bare-model baseline when given."""
    against = f" (bare {bare.success:.3f})" if bare is not None else ""
    if a.family == "membership":
        got = f"advantage {a.success:.3f}{against}"
    elif a.family == "extraction":
        got = f"fidelity {a.success:.3f}{against}, {a.undetected:.3f} before caught"
    else:
        got = f"success {a.success:.2f}{against}, {a.undetected:.2f} undetected"
    caught = f"first caught at query {a.first_caught}" if a.first_caught else "never caught"
    return f"{got}; {caught}"


def fp_upper_bound(false_positives: int, queries: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on the false-positive rate."""
    from scipy.stats import beta

    if queries == 0:
        return 1.0
    if false_positives >= queries:
        return 1.0
    return float(beta.ppf(confidence, false_positives + 1, queries - false_positives))


def shown(value: Any) -> str:
    """A searched value as the comments and the report print it: ``[{bits: 2}]``, ``0.9``."""
    return str(to_yaml(value)).replace("'", "")
