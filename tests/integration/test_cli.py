"""The ``guard`` command as a user runs it: real processes, real sockets, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from guard.clients import key_digest

ROOT = Path(__file__).parents[2]
GUARD = [sys.executable, "-m", "guard.cli"]


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GUARD, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, **kw
    )  # type: ignore[call-overload]


def test_check_prints_the_resolved_pipeline() -> None:
    result = run("check", "policies/default.yaml")
    assert result.returncode == 0, result.stderr
    assert "policies/default.yaml: OK (version 1, mode enforce)" in result.stdout
    resolved = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert resolved["models"]["digits"]["stages"][0]["stage"] == "validate"


def test_check_fails_with_exit_2_and_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "version: 1\nmodels:\n  digits:\n    model: builtin:digits\n    stages:\n      - validate: {max_batch: -3}\n"
    )
    result = run("check", str(path))
    assert result.returncode == 2
    assert (
        f"{path}: models.digits.stages[0].validate.max_batch must be >= 1; got -3" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_keygen_entry_loads_as_a_keys_file(tmp_path: Path) -> None:
    result = run("keygen", "alice", "--models", "digits")
    assert result.returncode == 0
    key = next(
        line.split()[-1] for line in result.stdout.splitlines() if line.startswith("#   gk_")
    )
    entry = "\n".join(line for line in result.stdout.splitlines() if not line.startswith("#"))
    keys = yaml.safe_load("clients:\n" + entry)
    assert keys["clients"]["alice"] == {"key_sha256": key_digest(key), "models": ["digits"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"guard exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError("guard did not become ready")


def infer(url: str, value: float) -> tuple[int, dict[str, object]]:
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [value] * 64}]}
    )
    request = urllib.request.Request(
        f"{url}/v2/models/digits/infer", data=body.encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_serve_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path, loop: str) -> None:
    policy = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": [{"validate": {"max": 16.0}}]}},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            *GUARD,
            "serve",
            "--policy",
            str(path),
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--loop",
            loop,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_ready(url, process)
        assert infer(url, 10.0)[0] == 200
        policy["models"]["digits"]["stages"][0]["validate"]["max"] = 5.0  # type: ignore[index]
        path.write_text(yaml.safe_dump(policy))
        process.send_signal(signal.SIGHUP)
        # A stateless policy runs a worker per CPU, each reloading on its own: wait until
        # every connection (a fresh one each, spread over the workers) sees the new policy.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(infer(url, 10.0)[0] == 400 for _ in range(8)):
                break
            time.sleep(0.05)
        status, body = infer(url, 10.0)
        assert status == 400 and "above the maximum 5" in str(body["error"])
        path.write_text("version: 1\nmodels: {}\n")  # invalid: the old policy must stay
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert infer(url, 3.0)[0] == 200
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "policy reload failed, keeping the previous policy" in output
    assert "Traceback" not in output


def test_serving_path_imports_no_offline_code() -> None:
    code = (
        "import sys, guard.server, guard.cli, guard.runtime\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('sklearn', 'skl2onnx', 'torch', 'tritonclient', 'matplotlib') "
        "or m.startswith(('guard.attacks', 'guard.tuning', 'guard.demo', 'guard.models.train'))]\n"
        "print(heavy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_demo_serves_real_traffic_refuses_hostile_input_and_catches_attackers() -> None:
    result = run("demo", "--requests", "40")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = [
        line.split()
        for line in out.splitlines()
        if line.strip().startswith(("digits", "breast_cancer", "shapes"))
    ]
    assert len(rows) == 5
    for row in rows:
        sent, ok, accuracy = int(row[-5]), int(row[-4]), float(row[-1])
        # shapes: a CNN at 0.84-0.9 held out, on a handful of images in a short run
        assert sent == ok and accuracy > (0.6 if row[0] == "shapes" else 0.8)
    hostile = out[out.index("hostile input") :]
    for name, status in [
        ("malformed JSON", 400),
        ("NaN in input", 400),
        ("oversized body", 413),
        ("unknown model", 404),
        ("no API key", 401),
    ]:
        line = next(line for line in hostile.splitlines() if line.strip().startswith(name))
        assert int(line.split()[len(name.split())]) == status
    table = out[out.index("who was caught") :]
    users = next(line for line in table.splitlines() if line.strip().startswith("alice, bob"))
    assert float(users.split("accuracy")[1].split()[0]) > 0.9
    evasion = next(
        line for line in table.splitlines() if line.strip().startswith("mallory-evasion")
    )
    caught = re.search(r"query (\d+)\s+(\w+) \((\w+)\)", evasion)
    assert caught is not None, evasion  # Square's near-duplicate queries: blacklight
    # With the guard a misdirected attacker may skip digits (their clean answer already looked
    # wrong to it): the denominators differ, the count fooled must not grow.
    fooled = [int(n) for n in re.findall(r"fooled the model on (\d+)/\d+", evasion)]
    assert len(fooled) == 2 and fooled[0] <= fooled[1]  # with the guard, then without
    for attacker in ("mallory-extraction", "mallory-membership"):
        assert any(line.strip().startswith(attacker) for line in table.splitlines())
    assert 'guard_requests_total{code="200"' in out
    assert "Traceback" not in out + result.stderr


def test_port_in_use_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port), "--metrics-port", "off")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("guard:")]
    assert errors == [errors[0]] and f"'127.0.0.1', {port}" in errors[0]
    assert "address already in use" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["check"], ["serve", "--policy"]])
def test_missing_policy_is_one_line_and_exit_2(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nope.yaml"
    result = run(*command, str(missing))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"guard: {missing}: cannot read policy: No such file or directory"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\nmodels: {}\n", "models must name at least one model"),
        ("version: 1\nmodels: [\n", "not valid YAML"),
        ("version: 2\nmodels: {m: {model: builtin:digits}}\n", "version must be 1; got 2"),
    ],
)
def test_bad_policy_is_one_line_and_exit_2(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run("check", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"guard: {path}: ") and message in result.stderr
    assert result.stdout == ""
    as_json = run("check", str(path), "--json")
    assert (as_json.returncode, as_json.stdout, as_json.stderr) == (2, "", result.stderr)


def test_usage_error_exits_2() -> None:
    result = run("serve", "--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in result.stderr
    result = run("serve", "--port", "70000")
    assert result.returncode == 2 and "argument --port: must be a port number" in result.stderr


def test_version_flag() -> None:
    result = run("--version")
    assert result.returncode == 0 and re.fullmatch(r"guard \d+\.\d+\.\d+\S*\n", result.stdout)


def test_runtime_failure_is_one_line_exit_1_traceback_only_on_debug(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["certify", "--model", "digits", "--sigma", "0.5", "--n", "200", "--n0", "10"]
    argv += ["--samples", "2", "--report", str(blocker / "r.csv")]
    result = run(*argv)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("guard: ")
    assert str(blocker) in result.stderr and "Traceback" not in result.stderr
    debug = run(*argv, "--log-level", "debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize("where", ["after", "before"])
def test_check_json_is_pure_json_on_stdout(where: str) -> None:
    argv = ["check", "policies/default.yaml", "--json"]
    if where == "before":
        argv = ["--log-level", "debug", *argv]
    result = run(*argv)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # the whole of stdout: no OK line, no log line
    assert document["ok"] is True and document["version"] == 1
    assert document["models"]["digits"]["stages"][0]["stage"] == "validate"
    assert any("keys_file" in w for w in document["warnings"])
    human = run("check", "policies/default.yaml")
    assert "warning: clients are identified by address" in human.stdout
    assert human.stdout.startswith("policies/default.yaml: OK")


def test_check_json_pipes_into_jq() -> None:
    import shutil

    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("jq is not installed")
    check = subprocess.Popen(
        [*GUARD, "check", "policies/default.yaml", "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    out = subprocess.run(
        [jq, "-r", ".models | keys[]"],
        stdin=check.stdout,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.wait(timeout=60) == 0 and out.returncode == 0
    assert out.stdout.split() == ["breast_cancer", "digits", "shapes"]


def run_on_terminal(*args: str) -> tuple[int, str, str]:
    """Run guard with stderr on a pseudo-terminal (stdout a pipe): exit code, stdout, stderr."""
    import pty

    master, slave = pty.openpty()
    process = subprocess.Popen(
        [*GUARD, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, text=False
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    out = process.stdout.read().decode() if process.stdout else ""
    process.wait(timeout=120)
    os.close(master)
    return process.returncode, out, b"".join(chunks).decode()


CERTIFY = ["certify", "--model", "digits", "--sigma", "0.5", "--n", "2000", "--n0", "20"]
CERTIFY += ["--samples", "30"]


def test_certify_draws_a_bar_on_a_terminal_and_nothing_in_a_pipe() -> None:
    code, out, err = run_on_terminal(*CERTIFY, "--log-level", "warning")
    assert code == 0, err
    assert "\r" in err and "certify [" in err and "30/30 100%" in err
    assert "certify [" not in out and "| radius |" in out
    piped = run(*CERTIFY, "--log-level", "warning")
    assert piped.returncode == 0 and "\r" not in piped.stderr and "certify [" not in piped.stderr


def test_load_draws_a_bar_of_its_seconds_on_a_terminal() -> None:
    argv = ["load", f"http://127.0.0.1:{free_port()}", "--model", "digits", "--duration", "1"]
    code, out, err = run_on_terminal(*argv, "--rate", "20")
    assert code == 1  # nothing answered: a runtime failure
    assert "load [" in err and "1/1 s" in err and "scheduled 20" in out
    piped = run(*argv, "--rate", "20")
    assert "load [" not in piped.stderr + piped.stdout


def test_attack_draws_a_bar_over_the_attacks_on_a_terminal() -> None:
    argv = ["attack", "--model", "digits", "--attack", "evasion", "--samples", "1"]
    argv += ["--budget", "50", "--log-level", "warning"]
    code, out, err = run_on_terminal(*argv)
    assert code == 0, err
    assert "attack [" in err and "4/4 100%" in err and "running " not in err
    assert out.startswith("attack ") and "hopskipjump" in out
    piped = run(*argv)
    assert "attack [" not in piped.stderr and "running hopskipjump ..." in piped.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_log_format_on_any_command(where: str) -> None:
    flags = ["--log-format", "json", "--log-level", "info"]
    argv = [*flags, "check", "policies/default.yaml", "--json"]
    if where == "after":
        argv = ["check", "policies/default.yaml", "--json", *flags]
    result = run(*argv)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records and all(r["level"] == "INFO" and "message" in r for r in records)
    assert json.loads(result.stdout)["ok"] is True


def test_an_error_on_a_terminal_gets_a_line_of_its_own(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _out, err = run_on_terminal(*CERTIFY, "--report", str(blocker / "r.csv"))
    assert code == 1
    last = [line for line in err.replace("\r\n", "\n").split("\n") if line.strip()][-1]
    assert last.split("\r\x1b[K")[-1].startswith(f"guard: File exists: {blocker}")
