"""docs/cli.md is generated from the parser and kept current."""

from __future__ import annotations

from pathlib import Path

from guard.cli import _parser
from guard.clidoc import DOC, EXAMPLES, main, render


def test_committed_page_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render(_parser()), (
        "docs/cli.md is out of date: run python -m guard.clidoc"
    )
    assert main(["--check"]) == 0


def test_check_fails_on_a_stale_page_and_writing_fixes_it(tmp_path: Path) -> None:
    page = tmp_path / "cli.md"
    page.write_text("# old\n")
    assert main(["--check", "--out", str(page)]) == 1
    assert main(["--out", str(page)]) == 0
    assert main(["--check", "--out", str(page)]) == 0


def test_page_covers_every_command_flag_and_example() -> None:
    text = render(_parser())
    for name, examples in EXAMPLES.items():
        assert f"## guard {name}\n" in text
        assert all(example in text for example in examples)
    for flag in ("--host", "--port", "--tls-cert", "--tls-key", "--loop", "--grpc-port"):
        assert f"- `{flag} " in text
    assert "- `policy`: the policy YAML to check" in text
    assert "- `2`: usage or configuration error" in text
    assert "``" not in text.replace("```", "") and ":func:" not in text
