"""A newcomer's first run: the README's first command works on the plain install.

``pip install '.[fast]' && guard demo`` installs neither scikit-learn nor matplotlib
(they come with the ``test``, ``attacks`` and ``plot`` extras). These tests run the
commands in a fresh interpreter where those packages cannot be imported, whatever this
environment has installed: a ``sys.meta_path`` finder refuses them, as a missing
package would. ``.ci/run`` also installs the README's first command into a venv of its
own and runs ``guard demo`` there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Runs `guard ARGS...` with the packages named in argv[1] (comma-separated) unimportable,
# then reports on stderr which imports of them were attempted.
SHIM = """
import sys

class Blocked:
    def __init__(self, names):
        self.names = set(names)
        self.tried = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            self.tried.append(fullname)
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None

blocked = Blocked(sys.argv[1].split(","))
sys.meta_path.insert(0, blocked)
from guard.cli import main

try:
    code = main(sys.argv[2:])
finally:
    print(f"blocked imports: {sorted(set(blocked.tried))}", file=sys.stderr)
sys.exit(code)
"""
PLAIN = "sklearn,matplotlib,skl2onnx,onnx,tritonclient,hypothesis"


def guard_without(
    blocked: str, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SHIM, blocked, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_the_shim_blocks_what_it_names() -> None:
    code = "import sklearn"
    result = subprocess.run(
        [sys.executable, "-c", SHIM.replace("from guard.cli import main", code), "sklearn", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert "No module named 'sklearn'" in result.stderr


def test_demo_runs_to_the_end_on_the_plain_install() -> None:
    result = guard_without(PLAIN, "demo", "--requests", "40")
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in out + result.stderr
    table = out[out.index("who was caught") :]
    for client in ("alice, bob", "mallory-evasion", "mallory-extraction", "mallory-membership"):
        assert any(line.strip().startswith(client) for line in table.splitlines()), client
    membership = next(
        line for line in table.splitlines() if line.strip().startswith("mallory-membership")
    )
    advantages = [float(a.split()[0]) for a in membership.split("advantage ")[1:]]
    assert len(advantages) == 2  # with the guard, and without
    # Not merely survived: nothing on the demo's path even tried the optional packages.
    assert "blocked imports: []" in result.stderr


def test_attack_membership_runs_without_sklearn_and_says_what_it_left_out() -> None:
    result = guard_without(PLAIN, "attack", "--model", "breast_cancer", "--attack", "membership")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    rows = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("membership")}
    assert rows == {"membership-loss", "membership-confidence", "membership-label-only"}
    assert "membership-shadow skipped" in result.stdout
    assert "inference-guard[attacks]" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("attack", "--model", "digits", "--attack", "simba", "--plots", "plots"),
        ("certify", "--model", "digits", "--sigma", "0.5", "--plot", "curve.png"),
    ],
)
def test_plots_without_matplotlib_name_the_extra(args: tuple[str, ...], tmp_path: Path) -> None:
    result = guard_without(PLAIN, *args[:-1], str(tmp_path / args[-1]), timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "needs matplotlib (pip install 'inference-guard[plot]')" in result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_ci_installs_what_the_readme_first_command_installs() -> None:
    """``.ci/run`` runs ``.ci/plain-demo.sh``, which installs the README's first command's
    extras from the checkout (not editable) and runs the demo: change one, change both."""
    readme = (REPO / "README.md").read_text()
    first = next(line for line in readme.splitlines() if "guard demo" in line and "pip" in line)
    install = first.split("pip install ", 1)[1].split(" && ", 1)[0]
    script = (REPO / ".ci" / "plain-demo.sh").read_text()
    assert f'pip" install --quiet {install})' in script
    assert " -e " not in script and "--editable" not in script
    assert 'bin/guard" demo' in script
    steps = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ".ci/plain-demo.sh" in steps


def test_an_image_folder_without_pillow_names_the_extra(tmp_path: Path) -> None:
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "1.png").write_bytes(b"")
    args = ("attack", "--model", "digits", "--data", str(tmp_path / "images"))
    result = guard_without("PIL", *args, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "needs Pillow (pip install 'inference-guard[images]')" in result.stderr
