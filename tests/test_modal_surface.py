"""shoal's public surface against Modal's client (1.6.x), from the stored reference
tests/data/modal_surface.json (regenerate it with a virtualenv that has `modal`:
`/work/modal-venv/bin/python scripts/modal_surface.py > tests/data/modal_surface.json`).
Goals (docs/modal-parity.md): >= 90 % of Modal's names present, >= 85 % with the same
parameters, all exception classes with Modal's hierarchy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REF = json.loads((ROOT / "tests" / "data" / "modal_surface.json").read_text())
_spec = importlib.util.spec_from_file_location("modal_surface", ROOT / "scripts" /
                                               "modal_surface.py")
surface = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(surface)


def test_coverage_goals():
    result = surface.compare(REF, surface.shoal_surface())
    missing = {c: r["missing"] for c, r in result["rows"].items() if r["missing"]}
    differ = {c: r["differ"] for c, r in result["rows"].items() if r["differ"]}
    assert result["present"] >= 0.90, f"{result['present']:.0%} present; missing {missing}"
    assert result["same"] >= 0.85, f"{result['same']:.0%} same; differ {differ}"


def test_every_exception_class_with_modals_hierarchy():
    rows = surface.compare(REF, surface.shoal_surface())["rows"]["exception"]
    assert rows["missing"] == [] and rows["differ"] == []


def test_exclusions_are_documented():
    doc = (ROOT / "docs" / "modal-parity.md").read_text()
    for name in surface.EXCLUDED:
        assert f"`{name}`" in doc, f"{name} is excluded but docs/modal-parity.md does not say why"


def test_readme_table_is_current():
    result = surface.compare(REF, surface.shoal_surface())
    assert surface.table(result) in (ROOT / "README.md").read_text(), \
        "README's coverage table is stale: python scripts/modal_surface.py table"


def test_reference_matches_installed_modal():
    modal = pytest.importorskip("modal")
    if modal.__version__ != REF["modal_version"]:
        pytest.skip(f"modal {modal.__version__} installed, reference is {REF['modal_version']}")
    assert json.loads(json.dumps(surface.modal_surface())) == REF
