"""The README's documented facts that the code can check."""

from __future__ import annotations

from pathlib import Path

from linewatch.streams.records import embed_description

ROOT = Path(__file__).resolve().parent.parent


def test_readme_stream_fields_match_the_records() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert embed_description(readme) == readme, (
        "README stream tables are stale: run linewatch streams describe --update README.md"
    )


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "./lw test" in readme and "./lw test" in ci
