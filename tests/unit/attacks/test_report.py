"""Reports: JSON with the shared fields, a readable table, optional plots; the CLI behind them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from guard.attacks.report import Report
from guard.attacks.suite import SuiteConfig, resolve, run_suite
from guard.attacks.targets import OnnxTarget, TargetSpec
from guard.commands import attack

SHARED = {
    "attack",
    "family",
    "unit",
    "units",
    "success_rate",
    "queries",
    "detected_fraction",
    "first_detection_query",
    "refused_fraction",
}


@pytest.fixture(scope="module")
def report() -> Report:
    config = SuiteConfig(model="digits", samples=2, budget=60, seed=1)
    return run_suite(
        ["square-linf", "knockoff", "inversion", "benign"],
        config,
        lambda _client: OnnxTarget.builtin("digits"),
    )


def test_every_entry_has_the_shared_fields_and_valid_json(report: Report, tmp_path: Path) -> None:
    assert [e["attack"] for e in report.entries] == [
        "square-linf",
        "knockoff",
        "inversion",
        "benign",
    ]
    for entry in report.entries:
        assert entry.keys() >= SHARED
    path = tmp_path / "report.json"
    report.write(path)
    loaded = json.loads(path.read_text())
    assert loaded["model"] == "digits" and loaded["seed"] == 1 and len(loaded["entries"]) == 4


def test_nan_and_numpy_values_become_plain_json(tmp_path: Path) -> None:
    report = Report(model="digits", target="local", seed=0)
    report.add(
        {"attack": "x", "value": float("nan"), "array": np.arange(2), "scalar": np.float32(0.5)}
    )
    report.write(tmp_path / "r.json")
    entry = json.loads((tmp_path / "r.json").read_text())["entries"][0]
    assert entry == {"attack": "x", "value": None, "array": [0, 1], "scalar": 0.5}


def test_the_table_has_a_row_per_entry(report: Report) -> None:
    lines = report.table().splitlines()
    assert lines[0].split()[:3] == ["attack", "unit", "n"] and len(lines) == 2 + len(report.entries)
    assert "fidelity" in lines[3] and "false positives" in lines[5]


def test_plots_are_written_when_matplotlib_is_installed(report: Report, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = report.plots(tmp_path)
    assert [p.name for p in paths] == ["success_vs_queries.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_names_resolve_with_aliases_and_tabular_models_skip_evasion() -> None:
    digits, cancer = TargetSpec.builtin("digits"), TargetSpec.builtin("breast_cancer")
    assert resolve(["square", "simba", "square-l2"], digits) == [
        "square-linf",
        "square-l2",
        "simba",
    ]
    assert "hopskipjump" not in resolve(["all"], cancer)
    with pytest.raises(ValueError, match="per-feature ranges"):
        resolve(["simba"], cancer)
    with pytest.raises(ValueError, match="unknown attack 'nes'"):
        resolve(["nes"], digits)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    attack.add_parser(parser.add_subparsers())
    args = parser.parse_args(["attack", *argv])
    return int(args.run(args))


def test_cli_runs_locally_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    code = run_cli(
        "--model",
        "digits",
        "--attack",
        "simba,jbda",
        "--samples",
        "2",
        "--budget",
        "60",
        "--report",
        str(out),
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "simba" in printed and "jbda" in printed
    entries = json.loads(out.read_text())["entries"]
    assert [e["attack"] for e in entries] == ["simba", "jbda"] and entries[1]["queries"] == 60


def test_cli_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--model", "digits", "--attack", "nope") == 2
    assert "unknown attack" in capsys.readouterr().err
    assert run_cli("--model", "digits", "--budget", "0") == 2
