"""``guard serve --workers N``: N guard processes on one port (SO_REUSEPORT).

The master process loads and checks the policy, then forks ``N`` workers; each runs
the whole guard (:func:`guard.cli.serve_forever`) on its own event loop and binds the
public port with ``SO_REUSEPORT``, so the kernel spreads connections over them. The
master binds nothing and serves nothing: it forwards ``SIGHUP`` (reload the policy) and
``SIGTERM``/``SIGINT`` (drain and stop) to every worker, restarts a worker that dies
unasked (after a second), and exits once every worker has. A master killed outright
(SIGKILL) takes its children along on Linux: each worker is sent SIGTERM and drains,
the state process is killed (``PR_SET_PDEATHSIG``).

State: detection spread over workers is caught exactly as on one only when they share
the state. The Redis backend does (one Redis for all workers and replicas). With
``state.backend: memory`` and a stage that keeps per-client state (budgets, detectors,
a privacy budget), the master first forks a *state process* holding the one memory
store, which the workers reach over a Unix socket (:mod:`guard.state.local`); it is
restarted (empty) if it dies, and stopped after the last worker. Such a policy runs one
worker unless ``--workers`` asks for more: in one process the store needs no socket.

gRPC (``--grpc-port``) is served by one process: with it the default is 1 and more
are refused.

Metrics: one endpoint for all workers (prometheus_client's multiprocess files). The
master makes a private directory (:func:`metrics_directory`, removed when it exits) and
names it in ``PROMETHEUS_MULTIPROC_DIR`` before forking; every worker counts in memory
and writes its values to its own files there every second, before a scrape and when it
stops (:mod:`guard.workerfiles`), and worker 0 serves ``/metrics`` on
``listen.metrics_port`` with the sum over all of them (:mod:`guard.metrics`): what a
worker wrote stays counted after it exits or is restarted (a worker killed by SIGKILL
loses at most its last second); the master removes a dead worker's live-gauge file
(``mark_process_dead``), so ``guard_requests_in_flight`` sums live workers only.
While worker 0 restarts (a second, then its start), the metrics port is closed.

Admin: ``/admin/*`` is served by worker 0 on the same port, the only operators'
listener (the other workers bind none). ``/admin/status`` describes worker 0 (its
policy and in-flight count; all workers run the same policy file). A successful
``/admin/reload`` reloads worker 0, then asks the master (``SIGUSR1``) to reload every
other worker as ``SIGHUP`` would; a failed one reloads none. ``SIGHUP`` to the master
reloads all.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
    """How many workers to run: ``asked``, or the CPUs; one when ``asked`` is left out and
    the memory store holds per-client state (more would need the state process)."""
    if asked is not None and asked < 1:
        raise SystemExit(f"guard: --workers must be >= 1; got {asked}")
    if asked is not None or policy.state.backend != "memory" or not stateful_stages(policy):
        return asked or default_workers()
    if default_workers() > 1:
        log.info(
            "one worker: --workers N runs N, sharing the memory state through a state "
            "process (state.backend: redis shares it across hosts)"
        )
    return 1


def needs_state_process(policy: Policy, workers: int) -> bool:
    """Whether ``workers`` workers of ``policy`` share its memory state through a state
    process: several of them, the memory backend, and a stage that keeps state."""
    return workers > 1 and policy.state.backend == "memory" and bool(stateful_stages(policy))


@dataclass(frozen=True)
class Helper:
    """A process the master runs beside its workers (the state process): started before
    them and restarted if it dies, not sent the signals they are sent, stopped after the
    last of them has exited."""

    name: str
    run: Callable[[], None]  # its body, in a forked child
    ready: Callable[[], bool]  # whether it serves (the workers start once it does)


@dataclass(frozen=True)
class Workers:
    """What worker ``index`` is told: where every worker writes its metrics (None: the
    metrics port is off, nothing is written), and its master's pid. Worker 0 alone serves
    the operators' listener (metrics and admin)."""

    index: int
    metrics_dir: str | None
    master: int


@contextlib.contextmanager
def metrics_directory() -> Iterator[str]:
    """A fresh private directory for the workers' metric files, named in
    ``PROMETHEUS_MULTIPROC_DIR`` (which the workers inherit) and removed on exit; the
    variable is restored. A master killed with SIGKILL leaves it behind in the temp dir."""
    with _private_directory("guard-metrics-") as path, _named("PROMETHEUS_MULTIPROC_DIR", path):
        yield path


@contextlib.contextmanager
def _private_directory(prefix: str, root: str | None = None) -> Iterator[str]:
    """A fresh directory in ``root`` (default: the temp dir) only this user can enter
    (mode 0700), removed on exit."""
    path = tempfile.mkdtemp(prefix=prefix, dir=root)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _named(variable: str, value: str) -> Iterator[None]:
    """``value`` in the environment variable ``variable`` (which forked workers inherit),
    restored on exit."""
    before = os.environ.get(variable)
    os.environ[variable] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


def _die_with(master: int, sig: signal.Signals) -> None:
    """In a child of ``master``: be sent ``sig`` when it dies, even by SIGKILL (Linux's
    ``PR_SET_PDEATHSIG``; elsewhere nothing), and exit now if it already has: no worker
    or state process outlives its master, holding the port or the state."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    if os.getppid() != master:
        os._exit(1)


@contextlib.contextmanager
def state_process(policy: Policy) -> Iterator[Helper]:
    """The state process of ``policy``'s workers (:mod:`guard.state.local`): its socket in
    a fresh private directory, named in ``GUARD_STATE_SOCKET`` for the workers to inherit
    (removed, and the variable restored, on exit). The per-process secrets a stage draws
    without a configured key (blacklight's hash key) are drawn here, before the workers
    are forked, so that they all hash alike."""
    from guard.stages.blacklight import process_secret
    from guard.state.local import SOCKET_ENV, run_state_process, serving

    process_secret()
    config = policy.state
    # A Unix socket's path holds 107 bytes: under a long TMPDIR, the directory goes in /tmp.
    root = None if len(tempfile.gettempdir()) <= 64 else "/tmp"
    with _private_directory("guard-state-", root) as directory:
        path = os.path.join(directory, "state.sock")
        with _named(SOCKET_ENV, path):
            yield Helper(
                name="state process",
                run=lambda: run_state_process(path, config.max_clients, config.max_bytes),
                ready=lambda: serving(path),
            )


def reload_others(master: int) -> Callable[[], None]:
    """What worker 0 does after a successful ``/admin/reload``: ask ``master`` to reload
    the other workers (``SIGUSR1``), unless this worker has lost it (then its parent is
    another process, which must not be signalled)."""

    def ask() -> None:
        if os.getppid() == master:
            os.kill(master, signal.SIGUSR1)

    return ask


def run_workers(
    count: int,
    serve: Callable[[int], None],
    *,
    metrics_dir: str | None = None,
    helper: Helper | None = None,
) -> int:
    """Fork ``count`` workers, each running ``serve(index)``; supervise them until told to
    stop. With ``metrics_dir`` (multiprocess metrics), a worker that exits has its
    live-gauge files removed there. ``helper`` runs beside them (see :class:`Helper`).
    Returns the exit status for the master."""
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, started at)
    stopping = False
    helper_pid = 0

    def start_helper(helper: Helper) -> None:
        nonlocal helper_pid
        master = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _die_with(master, signal.SIGKILL)  # it ignores SIGTERM
                helper.run()
            except BaseException:
                log.exception("the %s failed", helper.name)
                code = 1
            os._exit(code)
        helper_pid = pid
        deadline = time.monotonic() + EARLY_EXIT_S
        while not helper.ready():
            if time.monotonic() > deadline:
                log.error("the %s (pid %d) did not start serving", helper.name, pid)
                return
            time.sleep(0.01)
        log.info("the %s (pid %d) serves", helper.name, pid)

    def spawn(index: int) -> None:
        master = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, _defer_reload)  # until its loop handles reloads
            _die_with(master, signal.SIGTERM)  # a master killed outright: drain and stop
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

    def reload_all_but_first(_sig: int, _frame: object) -> None:  # worker 0 reloaded itself
        for pid, (index, _started) in list(children.items()):
            if index != 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    signal.signal(signal.SIGUSR1, reload_all_but_first)
    if helper is not None:
        start_helper(helper)
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
        if pid == helper_pid and helper is not None:
            helper_pid = 0
            if not stopping:
                log.error(
                    "the %s (pid %d) exited with %d; starting another",
                    helper.name,
                    pid,
                    os.waitstatus_to_exitcode(code),
                )
                time.sleep(RESTART_DELAY_S)
                start_helper(helper)
            continue
        index, started = children.pop(pid, (-1, 0.0))
        exit_code = os.waitstatus_to_exitcode(code)
        if metrics_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, metrics_dir)  # its in-flight gauge; counters stay
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
    if helper_pid:  # the workers are gone: nothing uses it any more
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(helper_pid, 0)
    return status
