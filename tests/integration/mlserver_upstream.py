"""A real MLServer (Seldon's Open Inference Protocol server) as an upstream for tests.

MLServer runs from its own virtualenv (``.ci/mlserver-venv.sh`` builds it), because its
dependency pins clash with the project's. :func:`start_mlserver` serves one scikit-learn
model on loopback only: HTTP and gRPC on free ports of 127.0.0.1, metrics off, no
parallel workers. The server runs in its own process group and logs to
``<model_dir>/mlserver.log``.

:func:`mlserver_breast_cancer` is a session-scoped pytest fixture serving the demo
``breast_cancer`` model, :func:`trained_breast_cancer` (tests compare against its
``estimator``). Import the fixture into a ``conftest.py`` to use it. Without a usable
MLServer venv (``$GUARD_MLSERVER_VENV``, default ``<repo>/.mlserver-venv``) it skips,
unless ``GUARD_REQUIRE_MLSERVER`` is set (to anything but ``0``): then it fails.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from guard.models.train import TrainedModel

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".mlserver-venv"
VENV_ENV = "GUARD_MLSERVER_VENV"
REQUIRE_ENV = "GUARD_REQUIRE_MLSERVER"
MODEL_FILE = "model.joblib"
LOG_FILE = "mlserver.log"
HOST = "127.0.0.1"
SKLEARN_RUNTIME = "mlserver_sklearn.SKLearnModel"
# Logged when a model fails to load; MLServer then keeps serving HTTP without it.
LOAD_FAILED = "failed to load during startup"


class MLServerStartError(RuntimeError):
    """MLServer exited or did not become ready; the message ends with its log's tail."""


@dataclass(slots=True)
class MLServerProcess:
    """A running ``mlserver start``; :meth:`stop` (or leaving ``with``) ends it."""

    model_name: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port``, the form ``tritonclient.http`` takes."""
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE

    def log(self) -> str:
        """MLServer's combined stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of :meth:`log`."""
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Send SIGTERM to the process group, SIGKILL after ``timeout`` s; wait. Idempotent."""
        if self.process.poll() is not None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> MLServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_mlserver(
    model_dir: Path,
    *,
    venv: Path,
    name: str = "breast_cancer",
    ready_timeout: float = 60.0,
    predict_fn: str | None = None,
) -> MLServerProcess:
    """Serve ``model_dir/model.joblib`` as model ``name`` and return once it is ready.

    Writes ``settings.json`` and ``<name>/model-settings.json`` into ``model_dir``, starts
    ``<venv>/bin/mlserver start model_dir`` in a new process group with ``model_dir`` as
    its working directory, and polls ``GET /v2/models/<name>/ready``. ``predict_fn``
    (e.g. ``predict_proba``) is the estimator method MLServer answers with. Raises
    :class:`FileNotFoundError` when the model or the venv's ``mlserver`` is missing and
    :class:`MLServerStartError` (after stopping the process) when MLServer exits or is
    not ready within ``ready_timeout`` seconds.
    """
    executable = venv / "bin" / "mlserver"
    if not executable.is_file():
        raise FileNotFoundError(f"{executable} not found; run .ci/mlserver-venv.sh {venv}")
    if not (model_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{model_dir / MODEL_FILE} not found")

    http_port, grpc_port = _free_ports(2)
    settings = {
        "host": HOST,
        "http_port": http_port,
        "grpc_port": grpc_port,  # MLServer cannot turn gRPC off
        "metrics_endpoint": None,  # no metrics server, no third port
        "parallel_workers": 0,  # infer in the main process: starts in seconds
    }
    parameters: dict[str, object] = {"uri": str((model_dir / MODEL_FILE).resolve())}
    if predict_fn is not None:
        parameters["extra"] = {"predict_fn": predict_fn}
    model_settings = {"name": name, "implementation": SKLEARN_RUNTIME, "parameters": parameters}
    (model_dir / "settings.json").write_text(json.dumps(settings, indent=2))
    (model_dir / name).mkdir(exist_ok=True)  # MLServer expects a folder named after the model
    (model_dir / name / "model-settings.json").write_text(json.dumps(model_settings, indent=2))

    # MLSERVER_* variables would override settings.json.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLSERVER")}
    with open(model_dir / LOG_FILE, "wb") as log:
        process = subprocess.Popen(
            [str(executable), "start", str(model_dir)],
            cwd=model_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MLServerProcess(model_name=name, port=http_port, workdir=model_dir, process=process)
    try:
        _wait_ready(server, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: MLServerProcess, timeout: float) -> None:
    # The server-wide /v2/health/ready says 200 even when the model failed to load (it is
    # then not registered), so wait for the model itself.
    deadline = time.monotonic() + timeout
    ready_url = f"{server.url}/v2/models/{server.model_name}/ready"
    while True:
        if (code := server.process.poll()) is not None:
            raise MLServerStartError(
                f"mlserver exited with status {code} before {server.model_name!r} was ready; "
                f"{server.log_path} ends with:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(ready_url, timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or the model is still loading
        if LOAD_FAILED in server.log():
            raise MLServerStartError(
                f"mlserver could not load {server.model_name!r}; "
                f"{server.log_path} ends with:\n{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise MLServerStartError(
                f"{server.model_name!r} not ready at {ready_url} after {timeout:.0f} s; "
                f"{server.log_path} ends with:\n{server.log_tail()}"
            )
        time.sleep(0.1)


def _free_ports(count: int) -> list[int]:
    """Distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # start_new_session: the group id is the leader's pid


def mlserver_venv() -> Path:
    """The MLServer venv: ``$GUARD_MLSERVER_VENV`` or ``<repo>/.mlserver-venv``."""
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)


def usable_mlserver_venv() -> Path:
    """:func:`mlserver_venv` when it can serve this interpreter's pickles; else the test
    skips (fails when ``GUARD_REQUIRE_MLSERVER`` is set)."""
    venv = mlserver_venv()
    if (problem := venv_problem(venv)) is not None:
        _unavailable(problem, venv)
    return venv


def venv_problem(venv: Path) -> str | None:
    """Why ``venv`` cannot serve models pickled by this interpreter, or ``None``.

    Pickles load reliably only under the same numpy and scikit-learn versions.
    """
    python = venv / "bin" / "python"
    if not (venv / "bin" / "mlserver").is_file() or not python.is_file():
        return f"no MLServer venv at {venv}"
    query = 'from importlib.metadata import version as v; print(v("numpy"), v("scikit-learn"))'
    result = subprocess.run([str(python), "-c", query], capture_output=True, text=True, timeout=60)
    theirs = result.stdout.split()
    ours = [version("numpy"), version("scikit-learn")]
    if result.returncode != 0 or theirs != ours:
        return f"{venv} has numpy, scikit-learn {theirs or '?'}; this interpreter has {ours}"
    return None


def _unavailable(reason: str, venv: Path) -> NoReturn:
    hint = f"run GUARD_PYTHON={sys.executable} .ci/mlserver-venv.sh {venv}"
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason}; {hint}. {REQUIRE_ENV} is set, so this is an error", pytrace=False)
    pytest.skip(f"{reason}; {hint}")


@functools.cache
def trained_breast_cancer() -> TrainedModel:
    """The demo breast cancer model (seed 0), trained once per process."""
    from guard.models.train import train_breast_cancer

    return train_breast_cancer(seed=0)


@pytest.fixture(scope="session")
def mlserver_breast_cancer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServerProcess]:
    """MLServer serving ``trained_breast_cancer().estimator`` as ``breast_cancer``."""
    import joblib

    venv = mlserver_venv()
    if (problem := venv_problem(venv)) is not None:
        _unavailable(problem, venv)
    model_dir = tmp_path_factory.mktemp("mlserver")
    joblib.dump(trained_breast_cancer().estimator, model_dir / MODEL_FILE)
    with start_mlserver(model_dir, venv=venv, name="breast_cancer") as server:
        yield server
