"""Config parsing: the contract names, durations, error messages that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfuse.cli import main
from tokenfuse.config import (
    ConfigError,
    format_duration,
    hash_key,
    load_config,
    parse_config,
    parse_duration,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tokenfuse.yaml"


def test_example_config_is_valid() -> None:
    """The checked-in example config validates and routes models to upstreams by glob."""
    cfg = load_config(EXAMPLE)
    assert set(cfg.departments) == {"marketing", "engineering", "support"}
    openai_upstream = cfg.route("gpt-4.1")
    assert openai_upstream is not None and openai_upstream.name == "openai"
    claude = cfg.route("claude-sonnet-4-5")
    assert claude is not None and claude.provider == "anthropic"
    assert cfg.route("llama-3") is None
    assert cfg.pricing.overrides["deepseek-v3.2"].output == pytest.approx(0.42)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15s", 15.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25), (42, 42.0), ("2.5", 2.5)],
)
def test_durations_parse_prometheus_style(text: object, seconds: float) -> None:
    """Durations are Prometheus-style strings or plain seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["5 minutes", "-1", "1x", "", True, None, "nan"])
def test_bad_durations_are_refused(bad: object) -> None:
    """Anything that is not a duration is an error, not a silent zero."""
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration_round_trips() -> None:
    """format_duration renders what parse_duration reads back."""
    for s in (1.0, 60.0, 90.0, 3600.0, 5400.0, 86400.0, 0.25):
        assert parse_duration(format_duration(s)) == pytest.approx(s)
    assert format_duration(3600) == "1h"


def test_error_names_the_field() -> None:
    """A bad budget is reported as departments.<name>.monthly_budget_usd with the rule broken."""
    with pytest.raises(ConfigError) as e:
        parse_config({"departments": {"marketing": {"monthly_budget_usd": 0}}})
    assert "departments.marketing.monthly_budget_usd: must be > 0" in str(e.value)


def test_unknown_keys_are_errors() -> None:
    """A misspelt key is an error naming it, never silently ignored."""
    with pytest.raises(ConfigError) as e:
        parse_config({"departments": {"marketing": {"monthly_budget": 5}}})
    assert "departments.marketing.monthly_budget: unknown key" in str(e.value)
    with pytest.raises(ConfigError, match="gatway"):
        parse_config({"gatway": {}})


def test_keys_must_be_hashed() -> None:
    """Keys in clear are refused with the command that makes a proper one."""
    with pytest.raises(ConfigError, match="tokenfuse keys new"):
        parse_config({"departments": {"ops": {"keys": ["tf-plain-key"]}}})
    cfg = parse_config({"departments": {"ops": {"keys": [hash_key("tf-abc")]}}})
    assert cfg.key_index() == {hash_key("tf-abc"): "ops"}


def test_same_key_in_two_departments_is_refused() -> None:
    """One key cannot bill two departments."""
    k = hash_key("tf-shared")
    with pytest.raises(ConfigError, match="also a key of"):
        parse_config({"departments": {"a": {"keys": [k]}, "b": {"keys": [k]}}})


def test_reserved_and_invalid_department_names() -> None:
    """'unassigned' is reserved and department names must be label-safe."""
    with pytest.raises(ConfigError, match="reserved"):
        parse_config({"departments": {"unassigned": {}}})
    with pytest.raises(ConfigError, match="department"):
        parse_config({"departments": {"Bad Name": {}}})


def test_prometheus_source_needs_url_and_timezone_must_exist() -> None:
    """Cross-field rules: prometheus source needs a URL; the time zone must be an IANA name."""
    with pytest.raises(ConfigError, match="prometheus_url"):
        parse_config({"policy": {"source": "prometheus"}})
    with pytest.raises(ConfigError, match="timezone: unknown time zone"):
        parse_config({"timezone": "Mars/Olympus"})
    assert parse_config({"timezone": "Asia/Tokyo"}).zone.key == "Asia/Tokyo"


def test_load_config_reports_unreadable_and_non_yaml(tmp_path: Path) -> None:
    """Missing files and broken YAML get their own error codes."""
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "missing.yaml")
    assert e.value.code == "config_unreadable"
    p = tmp_path / "bad.yaml"
    p.write_text("departments: [unclosed\n")
    with pytest.raises(ConfigError) as e2:
        load_config(p)
    assert e2.value.code == "config_not_yaml"


def test_cli_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tokenfuse check` exits 0 on a good file and 2 with the field named on a bad one."""
    assert main(["check", "--config", str(EXAMPLE)]) == 0
    bad = tmp_path / "t.yaml"
    bad.write_text("departments:\n  marketing:\n    monthly_budget_usd: -3\n")
    assert main(["check", "--config", str(bad)]) == 2
    assert "departments.marketing.monthly_budget_usd: must be > 0" in capsys.readouterr().err


def test_cli_keys_new_prints_matching_hash(capsys: pytest.CaptureFixture[str]) -> None:
    """`tokenfuse keys new` prints a key and the sha256 line that hashes it."""
    assert main(["keys", "new", "--department", "marketing"]) == 0
    out = capsys.readouterr().out
    key = out.split(": ", 1)[1].split()[0]
    assert key.startswith("tf-")
    assert hash_key(key) in out
    parse_config({"departments": {"marketing": {"keys": [hash_key(key)]}}})
