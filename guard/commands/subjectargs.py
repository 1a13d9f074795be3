"""The flags that name a model and its data, shared by ``guard attack``, ``guard tune``,
``guard certify`` and ``guard calibrate-squeeze`` (:mod:`guard.subject`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

MODEL_HELP = (
    "the model: a built-in name ({builtins}), an .onnx file, a model of --policy "
    "(its local file, else its upstream), or the URL of a V2 server (with --served-name)"
)


def add_subject_arguments(
    parser: argparse.ArgumentParser,
    *,
    policy: bool = True,
    model_help: str | None = None,
    data_help: str | None = None,
    input_aliases: tuple[str, ...] = (),
    scores_aliases: tuple[str, ...] = (),
) -> None:
    """``--model`` (required), ``--policy`` (unless the command has its own),
    ``--served-name``, ``--data``, ``--label-column`` and the interface overrides."""
    from guard.models import MODELS

    parser.add_argument(
        "--model", required=True, help=model_help or MODEL_HELP.format(builtins=", ".join(MODELS))
    )
    if policy:
        parser.add_argument(
            "--policy", type=Path, help="a policy YAML: --model names one of its models"
        )
    group = parser.add_argument_group("the model's data and interface (docs/own-model.md)")
    group.add_argument(
        "--data",
        help=data_help
        or "the data: .npz (x, y; optional x_members, y_members, x_train), .npy (rows only: "
        "labelled by the model's answers), .csv (label column last or --label-column), a "
        "folder of images CLASS/NAME.png, or a built-in name (default: a built-in model's own)",
    )
    group.add_argument(
        "--label-column", help="the .csv column holding the label: a header name or a 0-based index"
    )
    group.add_argument(
        "--served-name",
        help="the model's name on a V2 server (a --model URL, --target or a policy's upstream)",
    )
    group.add_argument(
        "--input-shape",
        type=_shape,
        metavar="D,D,...",
        help="one input row's shape, batch excluded, e.g. 32,32,3 or 30 (default: the "
        "policy's validate shape, else the model's)",
    )
    group.add_argument(
        "--input-range",
        type=_range,
        metavar="LO,HI",
        help="the inputs' value range, e.g. 0,1 (negative: --input-range=-1,1), or 'data' for "
        "each feature's minimum and maximum in the data (default: the policy's validate min "
        "and max, else a built-in's recorded range)",
    )
    group.add_argument(
        "--classes", type=_positive, metavar="N", help="number of classes (default: the model's)"
    )
    group.add_argument(
        "--input-name",
        *input_aliases,
        dest="input_name",
        help="the model's input (default: its only input)",
    )
    group.add_argument(
        "--scores-output",
        *scores_aliases,
        dest="scores_output",
        help="the output holding class probabilities (default: the model's one float "
        "[N, C] output; MLServer scikit-learn models: predict_proba)",
    )
    group.add_argument(
        "--label-output",
        help="the output holding the label (default: the model's one integer [N] output; "
        "none: the scores' argmax)",
    )


def subject_from_args(args: argparse.Namespace, *, model: str | None = None) -> Any:
    """The :class:`~guard.subject.Subject` the flags name."""
    from guard.subject import Overrides, resolve_subject

    return resolve_subject(
        model or args.model,
        data=args.data,
        policy=getattr(args, "policy", None),
        served_name=args.served_name,
        label_column=args.label_column,
        overrides=Overrides(
            input_name=args.input_name,
            input_shape=args.input_shape,
            input_range=args.input_range,
            classes=args.classes,
            scores_output=args.scores_output,
            label_output=args.label_output,
        ),
    )


def print_notes(subject: Any, command: str) -> None:
    """What the subject's resolution inferred, one ``note:`` line each, on stderr."""
    import sys

    for note in subject.notes:
        print(f"guard {command}: note: {note}", file=sys.stderr)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(
            f"must be positive sizes joined by commas, e.g. 32,32,3; got {text!r}"
        )
    return shape


def _range(text: str) -> tuple[float, float] | str:
    if text.strip().lower() == "data":
        return "data"
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be LO,HI (e.g. 0,1) or data; got {text!r}"
        ) from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"LO must be below HI; got {text!r}")
    return lo, hi


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 2; got {text!r}")
    return int(text)
