"""docs/stage-options.md is what ``python -m guard.stages.reference`` writes, and documents
exactly the keys each stage's options dataclass accepts."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from guard.stages import reference
from guard.stages.options import option

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "stage-options.md"
HEADING = re.compile(r"^(##|###) (\w+)(?:: `([^`]+)`)?$")
ROW = re.compile(r"^\| `(\w+)` \|")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
    size: int = option(1, doc="a size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    one: Inner | None = option(None, doc="a mapping")
    many: tuple[Inner, ...] = option((), doc="a list of mappings")
    plain: int = option(3, doc="a number")


def documented_keys(text: str) -> dict[tuple[str, str], list[str]]:
    """``(stage, section path)`` to the keys its table lists, read from the Markdown."""
    tables: dict[tuple[str, str], list[str]] = {}
    where: tuple[str, str] | None = None
    for line in text.splitlines():
        heading = HEADING.match(line)
        if heading:
            where = (heading[2], heading[3] or "")
            continue
        row = ROW.match(line)
        if row and where is not None:
            tables.setdefault(where, []).append(row[1])
    return tables


def test_committed_reference_is_current() -> None:
    # Stale after a stage's options change: run `python -m guard.stages.reference`.
    assert DOCS.read_text(encoding="utf-8") == reference.render()


def test_every_documented_key_is_a_field_of_the_stage_options() -> None:
    tables = documented_keys(DOCS.read_text(encoding="utf-8"))
    declared = reference.stage_classes()
    expected = {}
    for name, cls in declared.items():
        for path, options in reference.tables(cls.Options):
            expected[(name, path)] = [f.name for f in dataclasses.fields(options)]
            for key in getattr(options, "REMOVED", {}):
                assert key not in expected[(name, path)], f"{name}: removed key {key} documented"
    assert tables == expected


def test_nested_sections_are_found_by_path() -> None:
    assert reference.tables(Outer) == [("", Outer), ("one", Inner), ("many[]", Inner)]


def test_every_stage_has_a_section() -> None:
    text = reference.render()
    for name, cls in reference.stage_classes().items():
        assert hasattr(cls, "Options"), f"stage {name} declares no Options"
        assert f"\n## {name}\n" in text


def test_check_fails_on_a_stale_file_and_passes_once_written(tmp_path: Path) -> None:
    out = tmp_path / "stage-options.md"
    assert reference.main(["--check", "--output", str(out)]) == 1  # missing
    out.write_text(reference.render().replace("| key |", "| name |", 1), encoding="utf-8")
    assert reference.main(["--check", "--output", str(out)]) == 1  # edited by hand
    assert reference.main(["--output", str(out)]) == 0
    assert reference.main(["--check", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == reference.render()


def test_the_serving_path_never_imports_the_reference() -> None:
    code = "import sys, guard.server, guard.cli, guard.runtime\n"
    code += "print('guard.stages.reference' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
