"""The ``guard`` command: serve, check, demo, keygen."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.errors import PolicyError, UsageError
from guard.logs import FORMATS, setup_logging

if TYPE_CHECKING:
    from guard.config import Policy
    from guard.runtime import Runtime
    from guard.workers import Workers

DEFAULT_POLICY = Path(__file__).parent / "policies" / "default.yaml"
# Offline subcommands: modules under guard/commands/ with an ``add_parser(commands)``.
OFFLINE_COMMANDS: tuple[str, ...] = (
    "init",
    "attack",
    "tune",
    "certify",
    "calibrate_squeeze",
    "load",
)
log = logging.getLogger("guard")
_UNSET = object()  # an option not given on the command line (None is a value: off)


EXIT_CODES = (
    (0, "success"),
    (
        1,
        "runtime failure: a port already in use, an upstream or model that fails, "
        "a measurement that misses its target (tune --verify), a load run with 5xx or "
        "unanswered requests",
    ),
    (
        2,
        "usage or configuration error: an unknown flag or bad value, a missing or "
        "unreadable policy file, a policy that does not validate",
    ),
    (130, "interrupted (Ctrl-C)"),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # usage errors: one line and exit 2 (argparse)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("aiohttp.server").addFilter(_one_line_for_malformed_http)
    try:
        return int(args.run(args) or 0)
    except (PolicyError, UsageError) as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the command's own errors: one line, the traceback on debug
        if args.log_level == "debug":
            log.exception("guard %s failed", getattr(args, "command", ""))
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror:
            detail = f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
        _error(detail)
        return 1


def _error(text: str) -> None:
    """``guard: TEXT`` on one line of stderr, on a line of its own (a progress bar a
    failed command left is cleared first)."""
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    print(f"{clear}guard: {' '.join(text.split())}", file=sys.stderr)


def _one_line_for_malformed_http(record: logging.LogRecord) -> bool:
    """aiohttp logs each malformed HTTP request with a traceback at ERROR: a client
    could fill the log with them. Keep one WARNING line naming the client and the fault,
    without the bytes aiohttp quotes (the offending header, which may hold a key)."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        fault = str(exc.message or "").split(":", 1)[0].strip()
        record.msg = f"{record.getMessage()}: {type(exc).__name__} ({fault or exc.code})"
        record.args = ()
        record.exc_info = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _parser() -> argparse.ArgumentParser:
    from guard import __version__

    parser = argparse.ArgumentParser(
        prog="guard",
        description="An inference-time guard for model APIs: a proxy in front of a model "
        "server (Triton, KServe, MLServer, TF Serving) that validates, detects and "
        "limits queries, plus offline attacks, certification, load and tuning tools.",
        epilog=_exit_status_text(),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_flags(parser, defaults=True)
    commands = parser.add_subparsers(required=True, metavar="COMMAND", dest="command")

    serve = commands.add_parser("serve", help="run the guard")
    serve.add_argument(
        "--policy",
        type=Path,
        default=DEFAULT_POLICY,
        help="policy YAML (default: the built-in default)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)",
    )
    serve.add_argument(
        "--port", type=_port, default=8000, help="port of the public listener (default: 8000)"
    )
    serve.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="serve HTTPS (and gRPC over TLS) with this certificate chain; needs --tls-key",
    )
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    serve.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="event loop: uvloop if installed (auto), or force one (default: auto)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--metrics-host",
        help="address of the metrics and admin listener (default: the policy's "
        "listen.metrics_host, else 127.0.0.1)",
    )
    serve.add_argument(
        "--metrics-port",
        type=_metrics_port,
        default=_UNSET,
        help="port of the metrics and admin listener: a number, 0 for any free port, or off "
        "(default: the policy's listen.metrics_port, else 9180)",
    )
    serve.add_argument(
        "--grpc-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="also serve the Open Inference Protocol over gRPC on this port of --host "
        "(0: any free port; Triton's convention is 8001; default: off)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="guard processes sharing the port (SO_REUSEPORT; default: the CPUs this process "
        "may use, 1 with a memory state store and stateful stages, which N > 1 keeps in a "
        "state process they share; docs/deployment.md)",
    )
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate a policy and print the resolved pipeline")
    check.add_argument("policy", type=Path, help="the policy YAML to check")
    check.add_argument(
        "--json",
        action="store_true",
        help="print only JSON on stdout (the resolved pipeline and the warnings), "
        "for jq and scripts",
    )
    check.set_defaults(run=_check)

    demo = commands.add_parser("demo", help="serve the built-in default and show it working")
    demo.add_argument("--port", type=_port, default=0, help="port (default: any free one)")
    demo.add_argument("--requests", type=int, default=400, help="benign requests to send")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the traffic and the attacks (default: 0)"
    )
    demo.add_argument("--keep", action="store_true", help="keep serving after the demo")
    demo.set_defaults(run=_demo)

    keygen = commands.add_parser("keygen", help="make an API key and its keys-file entry")
    keygen.add_argument("name", help="the client's name in the keys file")
    keygen.add_argument("--models", nargs="*", help="models this client may call (default: all)")
    keygen.set_defaults(run=_keygen)

    for name in OFFLINE_COMMANDS:
        importlib.import_module(f"guard.commands.{name}").add_parser(commands)
    _finish(commands)
    return parser


class _Formatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal; text with line breaks (examples) kept as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_global_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--log-level and --log-format, on the main parser (with their defaults) and on every
    subcommand (without: a flag given before the subcommand is not reset after it)."""
    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--log-level",
        default="info" if defaults else argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="least severe log record written to stderr; debug also prints tracebacks "
        "of failures (default: info)",
    )
    group.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text" if defaults else argparse.SUPPRESS,
        help="text (one escaped line per record) or json (one object per line) (default: text)",
    )


def _finish(commands: argparse._SubParsersAction) -> None:
    """Every subcommand: the global flags, a description, its examples, plain text."""
    from guard.clidoc import EXAMPLES, plain

    helps = {a.dest: a.help for a in commands._choices_actions}
    for name, sub in commands.choices.items():
        _add_global_flags(sub, defaults=False)
        sub.formatter_class = _Formatter
        description = plain(sub.description or helps.get(name) or "")
        description = description.removeprefix(f"guard {name}: ")
        sub.description = description[:1].upper() + description[1:]
        if name in EXAMPLES:
            sub.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        for action in sub._actions:
            if action.help and action.help is not argparse.SUPPRESS:
                action.help = plain(action.help)


def _exit_status_text() -> str:
    import textwrap

    lines = ["exit status:"]
    for code, text in EXIT_CODES:
        lines += textwrap.wrap(text, 78, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
    lines += [
        "",
        "examples:",
        "  guard serve --policy policy.yaml --host 0.0.0.0 --port 8000",
        "  guard check policy.yaml --json | jq .models",
        "  guard COMMAND --help",
    ]
    return "\n".join(lines)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(
            f"must be a port number, 0 to 65535 (0: any free port); got {text!r}"
        )
    return int(text)


def _metrics_port(text: str) -> int | None:
    from guard.config import parse_metrics_port

    try:
        return parse_metrics_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a port number (0: any free port) or off; got {text!r}"
        ) from None


def _serve(args: argparse.Namespace) -> int:
    import dataclasses

    from guard.config import load_policy

    policy = load_policy(args.policy)  # fail before binding anything
    if bool(args.tls_cert) != bool(args.tls_key):
        print("guard: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    ssl_context = None
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"guard: --tls-cert/--tls-key: {exc.strerror or exc}", file=sys.stderr)
            return 2
    listen = policy.listen
    if args.metrics_host is not None:
        listen = dataclasses.replace(listen, metrics_host=args.metrics_host)
    if args.metrics_port is not _UNSET:
        listen = dataclasses.replace(listen, metrics_port=args.metrics_port)
    policy = dataclasses.replace(policy, listen=listen)
    from guard.workers import (
        Workers,
        metrics_directory,
        needs_state_process,
        run_workers,
        state_process,
        workers_for,
    )

    if args.grpc_port is not None and (args.workers or 1) > 1:
        print("guard: --grpc-port serves from one process; --workers must be 1", file=sys.stderr)
        return 2
    workers = 1 if args.grpc_port is not None else workers_for(policy, args.workers)

    def serve(worker: Workers | None) -> None:
        _run(
            serve_forever(
                policy,
                args.policy,
                args.host,
                args.port,
                ssl_context,
                args.access_log,
                grpc_port=args.grpc_port,
                tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
                worker=worker,
            ),
            args.loop,
        )

    if workers == 1:
        serve(None)
        return 0
    master = os.getpid()
    counted = metrics_directory() if listen.metrics_port is not None else contextlib.nullcontext()
    shared = state_process(policy) if needs_state_process(policy, workers) else None
    with counted as directory, shared or contextlib.nullcontext() as helper:
        return run_workers(
            workers,
            lambda index: serve(Workers(index=index, metrics_dir=directory, master=master)),
            metrics_dir=directory,
            helper=helper,
        )


async def serve_forever(
    policy: Policy,
    policy_path: Path,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    access_log: bool,
    *,
    grpc_port: int | None = None,
    tls: tuple[Path, Path] | None = None,
    worker: Workers | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. ``worker``: this process is one of several on the
    port (``SO_REUSEPORT``), counting its metrics in their shared directory."""
    from aiohttp import web

    from guard.appkeys import METRICS
    from guard.server import create_app, create_ops_app, make_runner, reload_policy
    from guard.workerfiles import FLUSH_S, WorkerFiles, use_worker_files

    files: WorkerFiles | None = None
    if worker is not None and worker.metrics_dir is not None:
        files = use_worker_files(worker.metrics_dir)  # before the app builds its metrics
    app = create_app(policy, policy_path=policy_path)
    grpc_listener = None
    if grpc_port is not None:
        from guard.grpc_server import add_grpc_listener

        grpc_listener = add_grpc_listener(app, host, grpc_port, tls=tls)
    runner = make_runner(
        app, access_log=log if access_log else None, idle_timeout=policy.limits.idle_timeout
    )
    try:
        await runner.setup()
    except OSError as exc:  # the gRPC port, bound as the app starts
        await runner.cleanup()
        raise SystemExit(f"guard: {exc}") from None
    if grpc_listener is not None:
        log.info("gRPC (Open Inference Protocol) on %s:%d", host, grpc_listener.port)
    site = web.TCPSite(
        runner,
        host,
        port,
        ssl_context=ssl_context,
        backlog=1024,
        reuse_port=True if worker is not None else None,
    )
    await site.start()
    scheme = "https" if ssl_context else "http"
    log.info("guard serving %s on %s://%s:%d", policy.source, scheme, host, port)
    runners = [runner]
    listen = policy.listen
    if listen.metrics_port is None:
        log.info("metrics and admin listener off (listen.metrics_port: off)")
    elif worker is not None and worker.index > 0:
        log.debug("worker %d: metrics and admin served by worker 0", worker.index)
    else:
        if worker is None:
            ops_app = create_ops_app(app)
        else:
            from guard.workers import reload_others

            exposition = None
            if worker.metrics_dir is not None and files is not None:
                exposition = app[METRICS].aggregate(worker.metrics_dir, files.flush)
            ops_app = create_ops_app(
                app, exposition=exposition, on_reload=reload_others(worker.master)
            )
        ops = make_runner(
            ops_app,
            access_log=logging.getLogger("guard.ops") if access_log else None,
            idle_timeout=policy.limits.idle_timeout,
        )
        await ops.setup()
        runners.append(ops)
        try:
            await web.TCPSite(
                ops, listen.metrics_host, listen.metrics_port, ssl_context=ssl_context
            ).start()
        except OSError as exc:
            await ops.cleanup()
            await runner.cleanup()
            raise SystemExit(
                f"guard: cannot listen for metrics and admin on "
                f"{listen.metrics_host}:{listen.metrics_port}: {exc.strerror or exc}"
            ) from None
        bound = ops.addresses[0][1] if ops.addresses else listen.metrics_port
        log.info(
            "metrics and admin on %s://%s:%d (/metrics, /admin/*)",
            scheme,
            listen.metrics_host,
            bound,
        )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        with contextlib.suppress(PolicyError):  # logged and counted; the old policy stays
            await reload_policy(app)

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    from guard.workers import take_pending_reload

    if take_pending_reload():  # a SIGHUP came while this worker started
        on_hup()
    flusher = loop.create_task(files.flush_every(FLUSH_S)) if files is not None else None
    try:
        await stop.wait()
    finally:
        log.info("guard shutting down")
        for each in runners:  # the public port drains first; metrics answer until then
            await each.cleanup()
        if files is not None and flusher is not None:
            flusher.cancel()
            files.close()  # everything this worker counted, for the workers that go on


def _run(coro: Coroutine[Any, Any, None], loop: str) -> None:
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise SystemExit(
                    "guard: --loop uvloop needs the 'fast' extra (pip install uvloop)"
                ) from None
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def _check(args: argparse.Namespace) -> int:
    import json

    from guard.config import load_policy
    from guard.runtime import build_runtime

    policy = load_policy(args.policy)
    runtime = build_runtime(policy, session=None)
    if args.json:  # stdout holds one JSON document and nothing else (logs go to stderr)
        document = {"ok": True, "version": policy.version, **runtime.describe()}
        document["warnings"] = check_warnings(runtime)
        print(json.dumps(document, indent=2, default=str))
        return 0
    print(f"{args.policy}: OK (version {policy.version}, mode {policy.mode})")
    print(json.dumps(runtime.describe(), indent=2, default=str))
    for warning in check_warnings(runtime):
        print(f"warning: {warning}")
    return 0


def check_warnings(runtime: Runtime) -> list[str]:
    """Policy shapes that load but are probably not what the operator meant."""
    from guard.defenses.squeeze import squeeze_warnings
    from guard.stages.scale import scale_warnings

    warnings = []
    for name, model in runtime.models.items():
        stages = [s.name for s in model.pipeline.stages]
        warnings += [f"models.{name}: {w}" for w in squeeze_warnings(stages)]
        metadata = model.local.model_metadata if model.local else None
        warnings += scale_warnings(
            name, model.config.stages, model.pipeline.stages, model.scale, metadata
        )
        if stages and stages[0] != "validate" and "validate" in stages:
            warnings.append(
                f"models.{name}: validate is not the first stage; "
                "earlier stages see unchecked input"
            )
        if "validate" not in stages:
            warnings.append(f"models.{name}: no validate stage; malformed input reaches the model")
    disclose = runtime.policy.disclose
    if disclose.headers:
        warnings.append(
            "disclose.headers is on: every client sees X-Guard-* verdicts (fine for trusted "
            "callers only; a detected attacker learns when it was caught)"
        )
    if disclose.reasons:
        warnings.append("disclose.reasons is on: refusals name the stage and its thresholds")
    if not runtime.policy.clients.uses_keys:
        warnings.append(
            "clients are identified by address (no keys_file): fine behind a trusted edge only"
        )
    return warnings


def _demo(args: argparse.Namespace) -> int:
    from guard.demo import run_demo

    return asyncio.run(
        run_demo(port=args.port, requests=args.requests, seed=args.seed, keep=args.keep)
    )


def _keygen(args: argparse.Namespace) -> int:
    from guard.clients import key_digest, new_key

    key = new_key()
    print(f"# API key for {args.name} (give it to the client; it is not stored anywhere):")
    print(f"#   {key}")
    print("# keys-file entry (under 'clients:'):")
    print(f"  {args.name}:")
    print(f'    key_sha256: "{key_digest(key)}"')
    if args.models:
        print(f"    models: [{', '.join(args.models)}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
