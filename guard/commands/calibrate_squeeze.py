"""``guard calibrate-squeeze``: the ``squeeze_detect`` threshold for a target false positive rate.

    guard calibrate-squeeze --model digits --fpr 0.01 --squeezer bits=3 --squeezer median=3 \\
        --image 8x8x1

Scores benign inputs with the model (named as for ``guard attack``: a built-in,
an ONNX file, a policy's model, a V2 server; :mod:`guard.subject`) and prints the
threshold from :func:`guard.defenses.squeeze.calibrate_threshold`, rounded up, and
the policy snippet that uses it. ``--holdout`` keeps a share of the inputs out of
the calibration and reports the false positive rate measured on them, an honest
estimate of the rate on new benign traffic.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

SQUEEZER_HELP = "a squeezer: bits=N, median=K, clip=LO:HI, or several joined by commas (repeatable)"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "calibrate-squeeze",
        help="pick the squeeze_detect threshold on benign data",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    from guard.commands.subjectargs import add_subject_arguments

    add_subject_arguments(
        parser,
        data_help="benign inputs: .npy, .npz (x), .csv, a folder of images, or a built-in name "
        "(default: a built-in model's held-out samples)",
        input_aliases=("--input",),
        scores_aliases=("--output",),
    )
    parser.add_argument(
        "--fpr", type=float, default=0.01, help="target false positive rate (default 0.01)"
    )
    parser.add_argument("--squeezer", action="append", required=True, help=SQUEEZER_HELP)
    parser.add_argument(
        "--range",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        help="value range of the squeezers (default: --input-range, else the policy's or a "
        "built-in's)",
    )
    parser.add_argument(
        "--image",
        help="HxWxC of each sample, e.g. 8x8x1 (needed by median; default: the model's "
        "input shape when it is H,W,C)",
    )
    parser.add_argument(
        "--layout",
        choices=["HWC", "CHW"],
        default="HWC",
        help="axis order of each sample: height, width, channels or channels first (HWC)",
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="share of inputs kept out to measure the rate (default 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the holdout split")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import yaml

    from guard.commands.subjectargs import print_notes, subject_from_args
    from guard.defenses.squeeze import calibrate_threshold, l1_distances

    if not 0.0 <= args.fpr < 1.0 or not 0.0 <= args.holdout < 1.0:
        return _fail("--fpr and --holdout must be in [0, 1)")
    subject = subject_from_args(args)
    print_notes(subject, "calibrate-squeeze")
    value_range = tuple(args.range) if args.range else _scalar_range(subject)
    x = subject.x
    try:
        image = _image(args.image, args.layout) if args.image else _model_image(subject, args)
        squeezers = [_squeezer(spec, value_range, image) for spec in args.squeezer]
    except ValueError as exc:
        return _fail(str(exc))
    if subject.scores_output is None:
        return _fail(f"{subject.name} has no scores output to compare: pass --output NAME")
    scores = _scorer(subject)
    if scores is None:
        return _fail(f"model has no output {subject.scores_output!r}")

    order = np.random.default_rng(args.seed).permutation(len(x))
    held = int(len(x) * args.holdout)
    calibration, holdout = x[order[held:]], x[order[:held]]
    threshold = _round_up(calibrate_threshold(scores, calibration, squeezers, args.fpr))
    print(f"threshold: {threshold} (target fpr {args.fpr:g} on {len(calibration)} benign inputs)")
    if held:
        rate = float((l1_distances(scores, holdout, squeezers).max(axis=1) > threshold).mean())
        print(f"false positive rate on {held} held-out inputs: {rate:.4f}")
    stage: dict[str, Any] = {"threshold": threshold}
    if value_range is not None:
        stage["range"] = list(value_range)
    if image is not None:
        stage["image"] = {
            "height": image.height,
            "width": image.width,
            "channels": image.channels,
            "layout": image.layout,
        }
    stage["squeezers"] = [_spec_dict(s) for s in squeezers]
    snippet = yaml.safe_dump([{"squeeze_detect": stage}], sort_keys=False, default_flow_style=None)
    print("# under models.<name>.stages:")
    print(snippet.rstrip())
    return 0


def _fail(message: str) -> int:
    import sys

    print(f"guard calibrate-squeeze: {message}", file=sys.stderr)
    return 2


def _scalar_range(subject: Any) -> tuple[float, float] | None:
    if not subject.has_range or subject.lo.ndim or subject.hi.ndim:
        return None
    return float(subject.lo), float(subject.hi)


def _model_image(subject: Any, args: argparse.Namespace) -> Any:
    """The model's own input shape as an image, when it is one (H,W,C or C,H,W)."""
    if len(subject.input_shape) != 3:
        return None
    text = "x".join(str(d) for d in subject.input_shape)
    if args.layout == "CHW":
        channels, height, width = subject.input_shape
        text = f"{height}x{width}x{channels}"
    return _image(text, args.layout)


def _scorer(subject: Any) -> Any:
    """Scores of flat rows: the local ONNX file's output (float32, as the stage sees
    them), else the server's answers; ``None`` when the file has no such output."""
    import numpy as np

    if subject.model_file is None:
        target = subject.target()
        return lambda batch: target.query(batch).scores
    from guard.backends.onnx import OnnxBackend
    from guard.inference import DATATYPES

    model = OnnxBackend(subject.model_file, name=subject.name, device="cpu")
    output, shape = subject.scores_output, subject.input_shape
    if output not in {s.name for s in model.outputs}:
        return None
    dtype = DATATYPES.get(subject.dtype, np.float32)

    def scores(batch: Any) -> Any:
        feed = {subject.input_name: batch.reshape(len(batch), *shape).astype(dtype)}
        return model.run(feed, [output])[output]

    return scores


def _image(text: str, layout: str) -> Any:
    from guard.defenses.squeeze import Image

    try:
        height, width, channels = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image must be HxWxC, e.g. 8x8x1; got {text!r}") from None
    return Image(height, width, channels, layout)


def _squeezer(spec: str, value_range: Any, image: Any) -> Any:
    from guard.defenses.squeeze import Squeezer

    options: dict[str, Any] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key in ("bits", "median") and value.isdigit():
            options[key] = int(value)
        elif key == "clip" and value.count(":") == 1:
            lo, hi = value.split(":")
            options["clip"] = (float(lo), float(hi))
        else:
            raise ValueError(f"--squeezer: expected bits=N, median=K or clip=LO:HI; got {part!r}")
    if "bits" in options and value_range is None:
        raise ValueError("--squeezer bits needs --range LO HI")
    if "median" in options and image is None:
        raise ValueError("--squeezer median needs --image HxWxC")
    return Squeezer(**options, value_range=value_range, image=image)


def _spec_dict(squeezer: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if squeezer.clip is not None:
        spec["clip"] = list(squeezer.clip)
    if squeezer.bits is not None:
        spec["bits"] = squeezer.bits
    if squeezer.median is not None:
        spec["median"] = squeezer.median
    return spec


def _round_up(value: float, digits: int = 4) -> float:
    """``value`` rounded up to ``digits`` significant digits (never lowers the threshold)."""
    if value <= 0.0:
        return value
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    rounded = math.ceil(value * scale) / scale
    return rounded if rounded >= value else value
