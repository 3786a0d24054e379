"""Prometheus rules generated from the config: shape, metric names, checked-in copy, promtool lint and unit tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import require_binary
from tokenfuse.alerting.rules import (
    ALERT_NAMES,
    DEFAULT_JOB,
    RECORDED,
    render_rules,
    severity_for,
    threshold_label,
)
from tokenfuse.cli import main as cli_main
from tokenfuse.config import Config, load_config, parse_config
from tokenfuse.exporter.metrics import METRIC_NAMES

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "examples" / "tokenfuse.yaml"
CHECKED_IN = REPO / "alerting-rules" / "tokenfuse-rules.yml"
PROMTOOL_TESTS = sorted((REPO / "alerting-rules" / "tests").glob("*.yml"))
RUNBOOK = REPO / "docs" / "runbook.md"
SEVERITIES = {"info", "warning", "critical"}
ANNOTATIONS = {"summary", "description", "runbook_url", "dashboard_url"}
DEPARTMENT_ALERTS = {
    "TokenfuseBudgetThreshold",
    "TokenfuseBudgetExhaustionForecast",
    "TokenfuseHourlyTokenLimit",
    "TokenfuseFuseOpen",
}


def _edge_config(**policy: Any) -> Config:
    """Departments without a budget, with fractional and above-100% thresholds, a custom token window."""
    return parse_config(
        {
            "departments": {
                "research": {"monthly_budget_usd": 50, "alert_thresholds": [0.125, 0.8, 1.5]},
                "ops": {"hourly_token_limit": 1000},
                "legal": {"monthly_budget_usd": 10, "alert_thresholds": [0.8]},
            },
            "policy": {"token_window": "30m", **policy},
        }
    )


def _rules(text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(recording rules, alerting rules) of a rendered file."""
    doc = yaml.safe_load(text)
    rules = [r for g in doc["groups"] for r in g["rules"]]
    return [r for r in rules if "record" in r], [r for r in rules if "alert" in r]


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_checked_in_rules_match_the_example_config() -> None:
    """alerting-rules/tokenfuse-rules.yml is exactly what `tokenfuse rules` renders for examples/tokenfuse.yaml."""
    expected = render_rules(load_config(EXAMPLE_CONFIG))
    assert CHECKED_IN.read_text(encoding="utf-8") == expected, (
        "alerting-rules/tokenfuse-rules.yml is stale; regenerate it with\n"
        "  tokenfuse rules --config examples/tokenfuse.yaml -o alerting-rules/tokenfuse-rules.yml\n"
        "and update alerting-rules/tests/*.yml if the alerts changed"
    )


def test_cli_writes_what_render_rules_returns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tokenfuse rules --config FILE -o OUT` writes render_rules(FILE) to OUT."""
    out = tmp_path / "nested" / "rules.yml"
    assert cli_main(["rules", "--config", str(EXAMPLE_CONFIG), "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_rules(load_config(EXAMPLE_CONFIG))
    assert str(out) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fraction", "label", "severity"),
    [
        (0.5, "50", "info"),
        (0.125, "12.5", "info"),
        (0.7499, "74.99", "info"),
        (0.75, "75", "warning"),
        (0.9, "90", "warning"),
        (0.99, "99", "warning"),
        (1.0, "100", "critical"),
        (1.5, "150", "critical"),
    ],
)
def test_threshold_label_and_severity(fraction: float, label: str, severity: str) -> None:
    """A threshold fraction becomes a percent label without float noise, and info < 75% ≤ warning < 100% ≤ critical."""
    assert threshold_label(fraction) == label
    assert severity_for(fraction) == severity


def test_one_threshold_alert_per_department_and_threshold() -> None:
    """Each department with a budget gets one TokenfuseBudgetThreshold per configured threshold, none without one."""
    _, alerts = _rules(render_rules(_edge_config()))
    got = {
        (a["labels"]["department"], a["labels"]["threshold"], a["labels"]["severity"], a["expr"])
        for a in alerts
        if a["alert"] == "TokenfuseBudgetThreshold"
    }
    assert got == {
        ("research", "12.5", "info", f'{RECORDED.used_percent}{{department="research"}} >= 12.5'),
        ("research", "80", "warning", f'{RECORDED.used_percent}{{department="research"}} >= 80'),
        ("research", "150", "critical", f'{RECORDED.used_percent}{{department="research"}} >= 150'),
        ("legal", "80", "warning", f'{RECORDED.used_percent}{{department="legal"}} >= 80'),
    }


def test_alerts_are_named_labelled_and_annotated_by_the_conventions() -> None:
    """Every alert is CamelCase `Tokenfuse…`, has a severity, the four annotations and a runbook anchor that exists."""
    headings = {
        line.removeprefix("## ").strip().lower()
        for line in RUNBOOK.read_text("utf-8").splitlines()
        if line[:3] == "## "
    }
    _, alerts = _rules(render_rules(load_config(EXAMPLE_CONFIG)))
    assert {a["alert"] for a in alerts} == set(ALERT_NAMES)
    for a in alerts:
        assert re.fullmatch(r"Tokenfuse(?:[A-Z][a-z0-9]+)+", a["alert"]), a["alert"]
        assert a["labels"]["severity"] in SEVERITIES, a
        assert set(a["annotations"]) == ANNOTATIONS, a["alert"]
        url, _, anchor = a["annotations"]["runbook_url"].partition("#")
        assert url == "https://github.com/tokenfuse/tokenfuse/blob/main/docs/runbook.md"
        assert anchor == a["alert"].lower() and anchor in headings, a["alert"]
        if a["alert"] in DEPARTMENT_ALERTS:
            assert "department" in a["expr"], a["alert"]
            assert a["annotations"]["dashboard_url"].endswith("?var-department={{ $labels.department }}")


def test_rules_spell_only_contract_metric_names() -> None:
    """Every raw metric the rules read is in the metric contract (or Prometheus' own `up`)."""
    recorded, alerts = _rules(render_rules(_edge_config()))
    recorded_names = {r["record"] for r in recorded}
    exprs = [r["expr"] for r in recorded + alerts]
    # Raw names: tokenfuse_/gen_ai_ words that are not part of a level:metric:operation recording name.
    raw = {m for e in exprs for m in re.findall(r"(?<![\w:])((?:tokenfuse|gen_ai)_\w+)(?![\w:])", e)}
    assert raw, "no raw metric found: the pattern is broken"
    assert raw <= METRIC_NAMES, raw - METRIC_NAMES
    used = {m for e in exprs for m in re.findall(r"(?<![\w:])(\w*:[\w:]+)", e)}
    assert used <= recorded_names, used - recorded_names


def test_recording_rules_aggregate_replicas_correctly() -> None:
    """Gauges every replica exports are max-ed per department; per-replica counters are summed."""
    recorded, _ = _rules(render_rules(load_config(EXAMPLE_CONFIG)))
    by_name = {r["record"]: r["expr"] for r in recorded}
    assert by_name[RECORDED.spent] == 'max by (department) (tokenfuse_budget_spent_usd{period="month"})'
    assert by_name[RECORDED.limit] == 'max by (department) (tokenfuse_budget_limit_usd{period="month"})'
    assert by_name[RECORDED.cost_rate("6h")] == "sum by (department) (rate(tokenfuse_cost_usd_total[6h]))"
    assert by_name[RECORDED.tokens_increase("1h")] == "sum by (department) (increase(tokenfuse_tokens_total[1h]))"


def test_token_window_follows_the_policy() -> None:
    """A 30m policy.token_window gives a 30m token increase and reads the window="30m" limit gauge."""
    recorded, alerts = _rules(render_rules(_edge_config()))
    by_name = {r["record"]: r["expr"] for r in recorded}
    assert by_name[RECORDED.tokens_increase("30m")] == "sum by (department) (increase(tokenfuse_tokens_total[30m]))"
    assert by_name[RECORDED.token_limit] == 'max by (department) (tokenfuse_token_limit{window="30m"})'
    (limit_alert,) = [a for a in alerts if a["alert"] == "TokenfuseHourlyTokenLimit"]
    assert RECORDED.tokens_increase("30m") in limit_alert["expr"]


def test_exporter_down_watches_the_given_job() -> None:
    """TokenfuseExporterDown fires on `up == 0` or absence of the job the rules are rendered for (default tokenfuse)."""
    for job, text in (
        (DEFAULT_JOB, render_rules(_edge_config())),
        ("llm-gw", render_rules(_edge_config(), job="llm-gw")),
    ):
        _, alerts = _rules(text)
        (down,) = [a for a in alerts if a["alert"] == "TokenfuseExporterDown"]
        assert down["expr"] == f'up{{job="{job}"}} == 0 or absent(up{{job="{job}"}})'


@pytest.mark.parametrize(
    ("on_error", "severity", "consequence"),
    [("fail_open", "warning", "requests pass without"), ("fail_closed", "critical", "every request is refused")],
)
def test_policy_source_down_reflects_the_failure_mode(on_error: str, severity: str, consequence: str) -> None:
    """TokenfusePolicySourceDown waits max_staleness, and fail_closed (everything refused) makes it critical."""
    _, alerts = _rules(render_rules(_edge_config(on_source_error=on_error, max_staleness="3m")))
    (down,) = [a for a in alerts if a["alert"] == "TokenfusePolicySourceDown"]
    assert down["for"] == "3m"
    assert down["labels"]["severity"] == severity
    assert consequence in down["annotations"]["description"]


def test_promtool_lint_passes_on_checked_in_and_edge_case_rules(tmp_path: Path) -> None:
    """`promtool check rules --lint-fatal` accepts the checked-in file and rules for unusual configs."""
    edge = tmp_path / "edge.yml"
    edge.write_text(render_rules(_edge_config(on_source_error="fail_closed"), job="llm-gw"), encoding="utf-8")
    empty = tmp_path / "empty.yml"
    empty.write_text(render_rules(parse_config({})), encoding="utf-8")
    for path in (CHECKED_IN, edge, empty):
        result = _promtool("check", "rules", "--lint-fatal", path)
        assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules alerting-rules/tests/*.yml` passes against the checked-in rules."""
    assert PROMTOOL_TESTS, "no promtool tests found"
    result = _promtool("test", "rules", *PROMTOOL_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_promtool_case_that_fires_and_one_that_must_not() -> None:
    """For each alert the promtool tests hold a case expecting it to fire (with labels and annotations) and one not."""
    fires: set[str] = set()
    silent: set[str] = set()
    for path in PROMTOOL_TESTS:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for case in group.get("alert_rule_test", []):
                expected = case.get("exp_alerts") or []
                if not expected:
                    silent.add(case["alertname"])
                elif all(e.get("exp_labels") and set(e.get("exp_annotations", {})) == ANNOTATIONS for e in expected):
                    fires.add(case["alertname"])
    assert fires >= set(ALERT_NAMES), set(ALERT_NAMES) - fires
    assert silent >= set(ALERT_NAMES), set(ALERT_NAMES) - silent
