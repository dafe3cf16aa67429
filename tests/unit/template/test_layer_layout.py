"""The README's map of the layer is the tree's: a module added, moved or re-described fails
here until `make layout` redraws it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tools"))

import layer_layout  # noqa: E402


def test_the_readme_shows_the_layer_as_it_is() -> None:
    assert layer_layout.readme_block(layer_layout.README.read_text()) == layer_layout.layout()


def test_every_module_of_the_layer_is_on_the_map() -> None:
    drawn = layer_layout.layout()
    for path in layer_layout.PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            assert f"`{path.name}`" in drawn, path


def test_a_subpackage_without_a_stated_purpose_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(layer_layout.PURPOSES, "fleet")
    with pytest.raises(SystemExit, match="fleet"):
        layer_layout.layout()


def test_the_layer_packages_re_export_nothing() -> None:
    for init in layer_layout.PACKAGE.rglob("__init__.py"):
        if init.parent != layer_layout.PACKAGE:
            assert init.read_text() == "", f"{init} should stay empty (import from the module)"
