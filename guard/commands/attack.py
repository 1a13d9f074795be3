"""``guard attack``: run the offline attack suite against a model or a guard.

``--target local`` (the default) attacks the built-in ONNX model in-process;
``--target http://HOST:PORT`` attacks a V2 endpoint (a guard, or any server)
serving it, one query per request unless ``--batch-size`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.attacks.targets import Target


def add_parser(commands: argparse._SubParsersAction) -> None:
    from guard.attacks.registry import help_text  # pure data: no numpy, no models

    parser = commands.add_parser(
        "attack",
        help="attack a model or a guard with the offline attack suite",
        description="Run evasion, extraction, membership, inversion and benign-traffic "
        "attacks; print a table and optionally write a JSON report and plots.",
    )
    parser.add_argument(
        "--model",
        required=True,
        choices=["digits", "breast_cancer", "shapes"],
        help="the built-in model attacked (its data and its local copy)",
    )
    parser.add_argument("--target", default="local", help="'local' or the URL of a V2 server/guard")
    parser.add_argument("--attack", default="all", help=help_text())
    parser.add_argument("--samples", type=int, default=10, help="evasion samples (default 10)")
    parser.add_argument("--budget", type=int, help="queries per unit (default: per attack)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every attack and the traffic (default: 0)"
    )
    parser.add_argument("--epsilon-l2", type=float, help="L2 radius in input units (digits: 10)")
    parser.add_argument(
        "--epsilon-linf", type=float, help="L-inf radius in input units (digits: 2)"
    )
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    parser.add_argument(
        "--plots", type=Path, help="write PNG plots into this folder (needs matplotlib)"
    )
    parser.add_argument("--api-key", help="X-API-Key for the attacking client")
    parser.add_argument("--benign-keys", help="comma-separated keys, one per benign client")
    parser.add_argument(
        "--benign-clients",
        type=int,
        help="honest clients of the benign mix (default: one per --benign-keys key, else 40)",
    )
    parser.add_argument(
        "--benign-popular", type=float, default=0.3, help="share of popular inputs (0.3)"
    )
    parser.add_argument(
        "--benign-retry", type=float, default=0.1, help="share of exact retries (0.1)"
    )
    parser.add_argument(
        "--benign-jitter",
        type=float,
        default=0.2,
        help="share of jittered inputs (0.2); fresh inputs are the rest",
    )
    parser.add_argument(
        "--attacker-keys",
        help="comma-separated extra keys of the attacker (Sybil accounts, junk senders)",
    )
    parser.add_argument(
        "--sybil-keys", type=int, default=10, help="accounts a Sybil attacker rotates over (10)"
    )
    parser.add_argument("--served-name", help="the model's name on the server (default: --model)")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="rows per request to a URL (default 1)"
    )
    parser.add_argument("--binary", action="store_true", help="use the binary tensor extension")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from guard.attacks.suite import SuiteConfig, run_suite
    from guard.attacks.targets import TargetError
    from guard.extras import hint, installed

    for flag in ("samples", "budget", "batch_size", "benign_clients", "sybil_keys"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(
                f"guard attack: --{flag.replace('_', '-')} must be >= 1; got {value}",
                file=sys.stderr,
            )
            return 2
    if args.plots and not installed("matplotlib"):  # before the attacks, not after them
        print(f"guard attack: --plots needs matplotlib {hint('matplotlib')}", file=sys.stderr)
        return 2
    keys = args.benign_keys.split(",") if args.benign_keys else []
    shares = (args.benign_popular, args.benign_retry, args.benign_jitter)
    if min(shares) < 0 or sum(shares) > 1 + 1e-9:
        print(
            "guard attack: --benign-popular, --benign-retry and --benign-jitter must be >= 0 "
            f"and sum to at most 1; got {shares}",
            file=sys.stderr,
        )
        return 2
    config = SuiteConfig(
        model=args.model,
        samples=args.samples,
        budget=args.budget,
        seed=args.seed,
        epsilon_l2=args.epsilon_l2,
        epsilon_linf=args.epsilon_linf,
        benign_clients=args.benign_clients or len(keys) or 40,
        benign_popular=args.benign_popular,
        benign_retry=args.benign_retry,
        benign_jitter=args.benign_jitter,
        sybil_keys=args.sybil_keys,
    )
    names = [n.strip() for n in args.attack.split(",") if n.strip()]
    try:
        with _single_blas_thread(), _attack_progress(names, args.model) as progress:
            report = run_suite(
                names,
                config,
                _factory(args, keys, _split(args.attacker_keys)),
                target_label=args.target,
                progress=progress,
            )
    except (TargetError, ValueError) as exc:
        print(f"guard attack: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    if args.report:
        report.write(args.report)
        print(f"report written to {args.report}")
    if args.plots:
        try:
            for path in report.plots(args.plots):
                print(f"plot written to {path}")
        except ImportError:
            print(f"guard attack: --plots needs matplotlib {hint('matplotlib')}", file=sys.stderr)
            return 1
    return 0


@contextlib.contextmanager
def _attack_progress(names: list[str], model: str) -> Iterator[Callable[[str], None]]:
    """A bar over the attacks on a terminal; else a "running NAME ..." line per attack."""
    from guard.attacks.suite import resolve
    from guard.attacks.targets import TargetSpec
    from guard.progress import Progress

    bar = Progress("attack", len(resolve(names, TargetSpec.builtin(model))))
    started = 0

    def step(name: str) -> None:
        nonlocal started
        if not bar.enabled:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            return
        bar.update(started, name)
        started += 1

    try:
        yield step
        bar.update(started, "")
    finally:
        bar.close()


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _factory(
    args: argparse.Namespace, benign_keys: list[str], attacker_keys: list[str]
) -> Callable[[int | None], Target]:
    """A fresh target per call: ``None`` for the attacker (``--api-key``), ``i >= 0``
    for benign client ``i`` (``--benign-keys``' i-th key, else ``--api-key``), ``-1 - j``
    for the attacker's extra account ``j`` (``--attacker-keys``' j-th, else ``--api-key``)."""
    from guard.attacks.targets import HttpTarget, OnnxTarget, TargetSpec

    if args.target == "local":
        return lambda _client: OnnxTarget.builtin(args.model)
    spec = TargetSpec.builtin(args.model)

    def make(client: int | None) -> HttpTarget:
        key = args.api_key
        if client is not None and 0 <= client < len(benign_keys):
            key = benign_keys[client]
        elif client is not None and client < 0 and -1 - client < len(attacker_keys):
            key = attacker_keys[-1 - client]
        return HttpTarget(
            args.target,
            args.served_name or args.model,
            spec,
            api_key=key,
            batch_size=args.batch_size,
            binary=args.binary,
        )

    return make


def _single_blas_thread() -> AbstractContextManager[Any]:
    """One BLAS thread: the attacks' small matrix products run faster so on a busy machine."""
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)
