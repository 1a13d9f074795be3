"""``guard serve --workers N``: N guard processes on one port (SO_REUSEPORT).

The master process loads and checks the policy, then forks ``N`` workers; each runs
the whole guard (:func:`guard.cli.serve_forever`) on its own event loop and binds the
public port with ``SO_REUSEPORT``, so the kernel spreads connections over them. The
master binds nothing and serves nothing: it forwards ``SIGHUP`` (reload the policy) and
``SIGTERM``/``SIGINT`` (drain and stop) to every worker, restarts a worker that dies
unasked (after a second), and exits once every worker has.

State: a worker's memory store is its own. Detection spread over workers is caught
exactly as on one only when they share the state, which the Redis backend does (one
Redis for all workers and replicas); with ``state.backend: memory``, ``--workers`` above
1 is refused when a model has a stage that keeps per-client state (budgets, detectors, a
privacy budget), and the default (``--workers`` left out) is then 1.

gRPC (``--grpc-port``) is served by one process: with it the default is 1 and more
are refused.

Metrics: each worker counts its own requests. With ``listen.metrics_port: P`` worker
``i`` serves ``/metrics`` and ``/admin/*`` on ``P + i`` (``0``: any free port each):
scrape every one and sum in Prometheus (``sum without (instance)``). Admin actions
reach only the worker asked; a policy reload goes to all through the master (SIGHUP).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from guard.config import Policy

log = logging.getLogger(__name__)

# Stages that keep no per-client state (the others use the state store).
STATELESS = frozenset({"validate", "certify", "squeeze", "squeeze_detect"})
RESTART_DELAY_S = 1.0
EARLY_EXIT_S = 5.0  # a worker failing this soon after its start is not restarted (bad setup)


_reload_pending = False


def _defer_reload(_sig: int, _frame: object) -> None:
    global _reload_pending
    _reload_pending = True


def take_pending_reload() -> bool:
    """Whether a SIGHUP reached this worker before it could reload (while it started): the
    policy it was forked with may then be stale, so it reloads once it serves."""
    global _reload_pending
    pending, _reload_pending = _reload_pending, False
    return pending


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def stateful_stages(policy: Policy) -> list[str]:
    """``model.stage`` of every stage that keeps per-client state in the store."""
    found = []
    for name, model in policy.models.items():
        for entry in model.stages:
            stateless = entry.kind in STATELESS or (
                entry.kind == "privacy" and not entry.options.get("budget")
            )
            if not stateless:
                found.append(f"{name}.{entry.kind}")
    return found


def workers_for(policy: Policy, asked: int | None) -> int:
    """How many workers to run: ``asked``, or the CPUs; raises SystemExit when ``asked``
    above 1 would split per-client state over private memory stores."""
    if asked is not None and asked < 1:
        raise SystemExit(f"guard: --workers must be >= 1; got {asked}")
    if policy.state.backend != "memory":
        return asked or default_workers()
    stateful = stateful_stages(policy)
    if not stateful:
        return asked or default_workers()
    if asked is not None and asked > 1:
        raise SystemExit(
            f"guard: --workers {asked} needs shared state: {', '.join(stateful[:4])} keep "
            "per-client state, which each worker's memory store would hold apart (an attack "
            "spread over workers would go unseen); use state: {backend: redis, ...}"
        )
    if asked is None and default_workers() > 1:
        log.info(
            "one worker: the memory state store is per process (state.backend: redis "
            "shares it across workers)"
        )
    return 1


def run_workers(count: int, serve: Callable[[int], None]) -> int:
    """Fork ``count`` workers, each running ``serve(index)``; supervise them until told to
    stop. Returns the exit status for the master."""
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, started at)
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, _defer_reload)  # until its loop handles reloads
            code = 0
            try:
                serve(index)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            os._exit(code)
        children[pid] = (index, time.monotonic())

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(count):
        spawn(index)
    log.info("guard master %d: %d workers (%s)", os.getpid(), count, sorted(children))
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index, started = children.pop(pid, (-1, 0.0))
        exit_code = os.waitstatus_to_exitcode(code)
        if stopping or index < 0:
            continue
        if exit_code != 0 and time.monotonic() - started < EARLY_EXIT_S:
            log.error("worker %d (pid %d) failed at start (%d); stopping", index, pid, exit_code)
            status = exit_code  # restarting would fail the same way (a port in use...)
            forward(signal.SIGTERM, None)
            continue
        log.warning("worker %d (pid %d) exited with %d; restarting", index, pid, exit_code)
        time.sleep(RESTART_DELAY_S)
        if not stopping:
            spawn(index)
    return status
