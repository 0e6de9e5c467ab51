"""The documentation cannot drift from the code: the flag reference is generated, the README stays short."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sparselayer.config import SECTIONS, field_help
from sparselayer.docs import REFERENCE, render

ROOT = Path(__file__).resolve().parents[1]


def test_reference_is_current():
    assert REFERENCE == ROOT / "docs" / "reference.md"
    assert REFERENCE.read_text() == render(), "docs/reference.md is stale: run `python -m sparselayer.docs`"


def test_every_setting_has_help():
    missing = [f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)
               if not field_help(kind).get(f.name)]
    assert not missing, f"config fields without help text (the dataclass docstring's Fields:): {missing}"
    for kind in SECTIONS.values():  # no stray entries either
        assert set(field_help(kind)) == {f.name for f in dataclasses.fields(kind)}, kind.__name__


def test_field_help_parsing_is_strict():
    """Continuation lines join their entry; a block ends at a dedent; a malformed line is an error, not lost text."""
    import pytest

    from sparselayer.config import _parse_fields

    doc = ("Title.\n\nFields:\n    a: first\n        more of a\n    b: second | x\n        | y\n\n"
           "Notes:\n    c: not a field\n")
    assert _parse_fields(doc) == {"a": "first more of a", "b": "second | x | y"}
    for bad in ("    a:\n        text", "    a: x\n      half-indented", "    a: x\n    a: again"):
        with pytest.raises(ValueError, match="Fields:"):
            _parse_fields("Title.\n\nFields:\n" + bad)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_test_command_is_what_ci_runs():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (ROOT / "README.md").read_text().splitlines()
