"""``guard init``: a first policy for a user's model, with its numbers measured on the user's data.

The stages are the default policy's (``guard/policies/default.yaml``); what depends on
the model is measured here, on the held-out rows of ``--data``, and commented in the
file with how it was measured:

* ``validate``: ``min``/``max`` from the declared range (``--input-range``, the
  model's sidecar), else the data's smallest and largest value; ``shape`` when the
  model's metadata does not give it (a V2 server that lists no inputs);
* ``privacy`` (``bins``): each bin's released confidence is the model's held-out
  accuracy on the rows whose top probability falls in it (the shape of the default
  policy's calibrated bins); left out when the model answers labels only;
* ``coverage``: its ``radius``, ``scale`` x the ``quantile`` of the held-out rows'
  nearest-neighbour distances, exactly as ``reference: builtin:NAME`` calibrates it;
* ``blacklight`` and ``provenance``: their parameters in input units are derived by
  the stages from ``validate``'s range and the input's size (docs/input-scale.md).
  They are left out, with a comment, when the features do not share one scale
  (tabular rows: the largest per-feature span over the median one exceeds
  :data:`TABULAR_SPREAD`; images pass, whose rarely lit border pixels span little):
  a step or a distance in "input units" then means nothing; and when a row has fewer
  than :data:`MIN_VALUES` values: an honest client's retry with a little noise and an
  attack's next step then look alike (measured on 20 features in [0, 1]: honest
  clients resending their rows with 2% noise had 5-27% of their answers misdirected
  by Blacklight, at every threshold ``guard tune`` tried).

The file is a starting point: ``guard attack`` measures it and ``guard tune`` tunes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from guard.subject import Subject

TABULAR_SPREAD = 10.0  # a feature spanning more times the median span: no shared input unit
MIN_VALUES = 64  # fewer values per row: no near-duplicate detectors (see the module)
CUT = 0.5  # the privacy bins' one cut: unsure (top probability < 0.5) or sure
MAX_BATCH = 256


@dataclass(frozen=True, slots=True)
class Measured:
    """What the data says about the model, each with the rows it was measured on."""

    lo: float
    hi: float
    range_source: str  # "declared" or "data"
    shared_scale: bool  # every feature spans a comparable range
    values: int  # per row
    spread: float  # largest over the median nonzero per-feature span
    accuracy: float  # held-out, of the bare model
    confidences: tuple[float, float] | None  # per privacy bin; None: label-only answers
    bin_rows: tuple[int, int]
    radius: float  # coverage's calibrated radius
    rows: int


def measure(subject: Subject) -> Measured:
    """Run the bare model on the subject's held-out rows and measure the policy's numbers."""
    from guard.stages.coverage import reference_radius

    x = subject.x
    if subject.lo is not None and subject.hi is not None and subject.spec.scalar_range:
        lo, hi, source = float(subject.lo), float(subject.hi), "declared"
    else:
        lo, hi, source = float(x.min()), float(x.max()), "data"
    spans = x.max(axis=0) - x.min(axis=0)
    nonzero = spans[spans > 0]
    spread = float(nonzero.max() / np.median(nonzero)) if len(nonzero) else 1.0
    target = subject.target()
    try:
        answers = target.query(x)
    finally:
        target.close()
    correct = answers.labels == subject.y
    confidences = None
    counts = (0, 0)
    if subject.scores_output is not None:
        top = np.nanmax(answers.scores, axis=1)
        unsure = top < CUT
        counts = (int(unsure.sum()), int((~unsure).sum()))
        confidences = (
            _bin_accuracy(correct[unsure], default=CUT / 2),
            _bin_accuracy(correct[~unsure], default=(1 + CUT) / 2),
        )
    return Measured(
        lo=lo,
        hi=hi,
        range_source=source,
        shared_scale=spread <= TABULAR_SPREAD,
        spread=spread,
        values=int(np.prod(subject.input_shape)),
        accuracy=float(correct.mean()),
        confidences=confidences,
        bin_rows=counts,
        radius=reference_radius(x),
        rows=len(x),
    )


def _bin_accuracy(correct: np.ndarray, *, default: float) -> float:
    """The bin's accuracy, kept inside (0, 1] (a confidence of 0 is refused); ``default``
    for an empty bin."""
    if len(correct) == 0:
        return default
    return float(min(1.0, max(0.01, correct.mean())))


def render(
    subject: Subject,
    measured: Measured,
    *,
    name: str,
    model_ref: str | None,
    upstream: str | None,
    command: str,
    policy_file: str = "POLICY",
    data_arg: str = "DATA",
) -> str:
    """The policy's YAML text, every measured number commented."""
    m = measured
    named = f"--policy {policy_file} --model {name} --data {data_arg}"
    lines = [
        f"# A first policy for {name}, written by `{command}`.",
        f"# Numbers measured on {m.rows} held-out rows of {subject.data_label} (bare model "
        f"accuracy {m.accuracy:.4f}).",
        "# Next, tune it against measured attacks and honest traffic:",
        f"#   guard tune {named} --out tuned.yaml",
        "# and attack it as served (guard serve --policy ...):",
        f"#   guard attack --target URL {named}",
        "version: 1",
        "mode: enforce",
        "",
        "models:",
        f"  {_key(name)}:",
    ]
    if model_ref is not None:
        lines.append(f"    model: {_scalar(model_ref)}")
    if upstream is not None:
        served = subject.served_name or name
        lines += ["    upstream:", f"      url: {_scalar(upstream)}"]
        if served != name:
            lines.append(f"      model: {_scalar(served)}")
    lines += ["    stages:", "      - validate:"]
    if subject.input_name and subject.model_file is None:
        lines.append(f"          input: {_scalar(subject.input_name)}")
    range_note = (
        "the declared input range"
        if m.range_source == "declared"
        else "the smallest and largest value in the data: widen it to the inputs' true range"
    )
    lines += [
        f"          min: {_num(m.lo)}       # {range_note}",
        f"          max: {_num(m.hi)}",
    ]
    if subject.model_file is None:  # an upstream may not list its input's shape
        lines.append(f"          shape: {list(subject.input_shape)}")
    lines.append(f"          max_batch: {MAX_BATCH}")
    output = _output_key(subject)
    if m.confidences is not None:
        low, high = m.confidences
        lines += [
            "      - privacy:           # label and runner-up exact, confidence calibrated",
            "          mechanism: bins",
            *output,
            f"          cuts: [{CUT}]      # unsure (top probability < {CUT}) or sure",
            f"          confidences: [{_num(low)}, {_num(high)}]   # held-out accuracy in each "
            f"bin ({m.bin_rows[0]} and {m.bin_rows[1]} rows)",
            "          ranked: 1",
        ]
    else:
        lines.append("      # privacy left out: the model answers labels only")
    lines += [
        "      - budget:            # per-client quotas: 429 with Retry-After past them",
        "          limits: [{queries: 1200, per: 1m}, {queries: 20000, per: 1d}]",
    ]
    if m.shared_scale and m.values >= MIN_VALUES:
        lines += [
            "      - blacklight:        # near-duplicate queries; quantize and window derived",
            "          matches: 6       # from validate's range and the input size",
            "          max_per_client: 1000",
            "          action: misdirect",
            "          degrade_for: 1h",
            "      - provenance:        # chains of close queries; distance derived likewise",
            "          links: 12",
            "          action: misdirect",
            "          degrade_for: 1h",
        ]
    elif not m.shared_scale:
        lines += [
            f"      # blacklight and provenance left out: a feature spans {m.spread:.0f} times the",
            "      # median feature's range, so a quantization step or a distance has no one",
            "      # unit (scale the features,",
            "      # then add them: docs/input-scale.md)",
        ]
    else:
        lines += [
            f"      # blacklight and provenance left out: {m.values} values per row are too few",
            "      # to tell an honest retry with a little noise from an attack's next step",
        ]
    lines += [
        "      - prada:             # extraction-like query distributions",
        *output,
        "          delta: 0.9",
        "          min_queries: 100",
        "          action: misdirect",
        "          degrade_for: 1h",
        "      - coverage:          # natural-data extraction: many new inputs over every class",
        *output,
        f"          radius: {_num(m.radius)}  # 0.5 x the 1% quantile of the held-out rows' "
        "nearest-neighbour distances",
        "          window: 1000",
        "          min_novel: 200",
        "          min_fraction: 0.9",
        "          min_entropy: 0.7",
        "          max_novel: 600",
        "          accounts: false",
        "          action: flag",
        "",
    ]
    return "\n".join(lines)


def model_reference(model_file: Path, policy_path: Path | None) -> str:
    """``model:`` as the policy names it: relative to the policy's folder when it can be,
    else absolute (a policy printed to standard output may be saved anywhere)."""
    if policy_path is None:
        return str(model_file.resolve())
    target = model_file.resolve()
    try:
        return str(target.relative_to(policy_path.resolve().parent))
    except ValueError:
        return str(target)


def _output_key(subject: Subject) -> list[str]:
    """``output:`` for the stages that read the class scores, when the model's scores
    output is not one the stages find by themselves."""
    from guard.stages.shared import PREFERRED_OUTPUTS

    scores = subject.scores_output
    if scores is None or scores in PREFERRED_OUTPUTS:
        return []
    return [f"          output: {_scalar(scores)}"]


def _num(value: float) -> str:
    return f"{value:.6g}"


def _key(name: str) -> str:
    return _scalar(name)


def _scalar(value: str) -> str:
    """A YAML scalar for ``value``, quoted when plain would not read back the same."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("\n...").strip()
