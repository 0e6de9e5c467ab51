"""The documentation cannot drift from the code: the flag reference is generated, the README stays short."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sparselayer.config import SECTIONS, RLConfig, field_help
from sparselayer.docs import REFERENCE, render

ROOT = Path(__file__).resolve().parents[1]


def test_reference_is_current():
    assert REFERENCE == ROOT / "docs" / "reference.md"
    assert REFERENCE.read_text() == render(), "docs/reference.md is stale: run `python -m sparselayer.docs`"


def test_every_setting_has_help():
    missing = [f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)
               if not field_help(kind).get(f.name)]
    assert not missing, f"config fields without help text (the dataclass docstring's Fields:): {missing}"
    assert set(field_help(RLConfig)) == {f.name for f in dataclasses.fields(RLConfig)}  # no stray entries


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_test_command_is_what_ci_runs():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (ROOT / "README.md").read_text().splitlines()
