"""Department labels: configured departments only, or, with none configured, the names given in code (capped)."""

from __future__ import annotations

import logging

import pytest

from tokenfuse.config import UNASSIGNED, hash_key, parse_config
from tokenfuse.exporter.labels import OTHER, LabelBounds


def test_without_departments_the_name_in_code_is_the_label() -> None:
    """No departments in config: a valid department name given in code is its own label."""
    b = LabelBounds(parse_config({}))
    assert b.department("marketing") == "marketing"
    assert b.department("sales") == "sales"
    assert b.department(None) == UNASSIGNED
    assert b.department("Not Valid!") == UNASSIGNED


def test_without_departments_names_are_capped() -> None:
    """Beyond metering.max_departments distinct names, further ones are 'other'; known ones stay."""
    b = LabelBounds(parse_config({"metering": {"max_departments": 3}}))
    assert [b.department(f"d{i}") for i in range(5)] == ["d0", "d1", "d2", OTHER, OTHER]
    assert b.department("d1") == "d1"


def test_with_departments_unknown_is_unassigned_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """With departments configured an unknown name is 'unassigned', and said once per name."""
    b = LabelBounds(parse_config({"departments": {"marketing": {"keys": [hash_key("k")]}}}))
    with caplog.at_level(logging.WARNING, logger="tokenfuse.exporter"):
        assert b.department("marketing") == "marketing"
        assert b.department("sales") == UNASSIGNED
        assert b.department("sales") == UNASSIGNED
    assert sum("'sales' is not configured" in r.getMessage() for r in caplog.records) == 1
