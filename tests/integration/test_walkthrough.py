"""The README's walk-through for a user's own model, run line for line as a user would.

The commands are read from the README's block marked ``<!-- walkthrough: ... -->``, so
the README cannot drift from what works: a scikit-learn model exported to ONNX, its
``.npz`` data, ``guard attack`` on the bare model, ``guard init``, ``guard tune``,
``guard serve`` of the tuned policy, and ``guard attack`` through it. A second test runs
the same chain with the model behind a real MLServer (the README's upstream block).
Every ``guard`` is a real process; the port 8000 of the README is a free one here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from guard.config import load_policy
from tests.integration.test_cli import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- walkthrough:"
README_PORT = "8000"
# The checkout's guard, whichever folder the commands run in (as an installed guard would be).
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def readme_blocks() -> tuple[list[str], list[str]]:
    """The walk-through's command lines and the upstream block's after it (comments cut)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(MARK)
    blocks = []
    at = start
    for _ in range(2):
        begin = text.index("```sh\n", at) + len("```sh\n")
        end = text.index("```", begin)
        blocks.append([_command(line) for line in text[begin:end].splitlines() if _command(line)])
        at = end + 3
    return blocks[0], blocks[1]


def _command(line: str) -> str:
    return line.split("  #", 1)[0].strip()


def guard_argv(line: str, port: int) -> list[str]:
    words = shlex.split(line.replace(README_PORT, str(port)).removesuffix("&").strip())
    assert words[0] == "guard", line
    return [sys.executable, "-m", "guard.cli", *words[1:]]


def run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv[3:]} exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


@contextmanager
def serving(argv: list[str], cwd: Path, port: int) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        argv, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_ready(url, process)  # type: ignore[arg-type]
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def entry(report: Path, attack: str) -> dict[str, object]:
    entries = json.loads(report.read_text())["entries"]
    return next(e for e in entries if e["attack"] == attack)


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    lines, _ = readme_blocks()
    assert lines[0].startswith("pip install"), "the test extra installs what it names"
    assert lines[1] == "python examples/own_model.py mine"
    assert any(line.endswith("&") for line in lines), "it serves the tuned policy"
    run([sys.executable, str(ROOT / "examples" / "own_model.py"), "mine"], tmp_path)
    port = free_port()
    with ExitStack() as servers:
        for line in lines[2:]:
            argv = guard_argv(line, port)
            if line.endswith("&"):
                servers.enter_context(serving(argv, tmp_path, port))
            else:
                run(argv, tmp_path)
    mine = tmp_path / "mine"
    assert list(load_policy(mine / "tuned.yaml").models) == ["mine"]
    assert (mine / "tuning.md").read_text().startswith("# Tuning `mine`")
    bare, guarded = entry(mine / "bare.json", "knockoff"), entry(mine / "guarded.json", "knockoff")
    assert bare["first_detection_query"] is None  # the bare model tells no one
    assert guarded["first_detection_query"] is not None  # the guard did, early
    assert float(guarded["first_detection_query"]) <= 1000  # type: ignore[arg-type]


def test_the_walkthrough_behind_mlserver(tmp_path: Path) -> None:
    from tests.integration.mlserver_upstream import start_mlserver, usable_mlserver_venv

    venv = usable_mlserver_venv()  # skips without MLServer (fails when CI requires it)
    _, lines = readme_blocks()
    run([sys.executable, str(ROOT / "examples" / "own_model.py"), "mine"], tmp_path)
    mine = tmp_path / "mine"
    server = start_mlserver(mine, venv=venv, name="mine", predict_fn="predict_proba")
    try:
        port = free_port()
        init, tune, serve = (guard_argv(line, port) for line in lines)
        init = [server.url if word == "http://127.0.0.1:8080" else word for word in init]
        run(init, tmp_path)
        policy = load_policy(mine / "upstream.yaml")
        assert policy.models["mine"].upstream is not None
        run(tune, tmp_path)
        with serving(serve, tmp_path, port) as url:
            body = json.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 20], "datatype": "FP32", "data": [0.5] * 20}
                    ]
                }
            ).encode()
            import urllib.request

            request = urllib.request.Request(f"{url}/v2/models/mine/infer", data=body)
            with urllib.request.urlopen(request, timeout=10) as reply:
                answer = json.loads(reply.read())
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert outputs["predict_proba"]["shape"] == [1, 4]
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
