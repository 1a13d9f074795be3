"""``guard init``: write a first policy for your own model, measured on your data.

The model and its data are named as for ``guard attack`` (:mod:`guard.subject`): an
ONNX file the guard will serve itself, or a V2 server (``--model http://host:port
--served-name NAME``) it will sit in front of. The default policy's stages, with the
model-dependent numbers measured on the data's held-out rows (:mod:`guard.scaffold`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    from guard.commands.subjectargs import add_subject_arguments

    parser = commands.add_parser(
        "init",
        help="write a first policy for your own model, measured on your data",
        description=__doc__.splitlines()[0],
    )
    add_subject_arguments(
        parser,
        policy=False,
        model_help="the model: an .onnx file the guard serves, or the URL of a V2 server it "
        "guards (with --served-name)",
    )
    parser.add_argument("--name", help="the model's name in the policy (default: the file's stem)")
    parser.add_argument("--out", type=Path, help="write the policy here (default: standard output)")
    parser.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from guard.commands.subjectargs import print_notes, subject_from_args
    from guard.scaffold import measure, model_reference, render

    if args.out is not None and args.out.exists() and not args.force:
        print(f"guard init: {args.out} exists (--force overwrites it)", file=sys.stderr)
        return 2
    if args.data is None:
        print(
            "guard init: --data is needed: the held-out rows the policy's numbers are "
            "measured on (.npz, .npy, .csv or a folder of images)",
            file=sys.stderr,
        )
        return 2
    subject = subject_from_args(args)
    print_notes(subject, "init")
    if subject.builtin_name is not None:
        print(
            f"guard init: {args.model} is built in: its policy is in the default one "
            "(guard/policies/default.yaml)",
            file=sys.stderr,
        )
        return 2
    name = args.name or (
        subject.model_file.stem if subject.model_file is not None else subject.name
    )
    model_ref = (
        model_reference(subject.model_file, args.out) if subject.model_file is not None else None
    )
    command = f"guard init --model {args.model} --data {args.data}"
    text = render(
        subject,
        measure(subject),
        name=name,
        model_ref=model_ref,
        upstream=subject.url,
        command=command,
        policy_file=str(args.out) if args.out is not None else "POLICY",
        data_arg=str(args.data),
    )
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"policy for {name} written to {args.out}", file=sys.stderr)
    return 0
