"""The generated Alertmanager config: receivers, routes, inhibitions, checked-in copy, amtool validation and routing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import require_binary
from tokenfuse.alerting.alertmanager import (
    DEFAULT_RECEIVER,
    ESCALATION_RECEIVER,
    NULL_RECEIVER,
    department_receiver,
    render_alertmanager,
)
from tokenfuse.cli import main as cli_main
from tokenfuse.config import Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "examples" / "tokenfuse.yaml"
CHECKED_IN = REPO / "alerting-rules" / "alertmanager.yml"
ROUTE_CASES = REPO / "alerting-rules" / "route-tests.yml"


def _rich_config(**alerting: Any) -> Config:
    """Own and shared Slack channels, Discord and webhook escalation, fractional thresholds."""
    return parse_config(
        {
            "departments": {
                "marketing": {"monthly_budget_usd": 500, "slack_channel": "#marketing-llm"},
                "research": {"monthly_budget_usd": 50, "alert_thresholds": [0.125, 0.5, 1.0]},
                "ops": {"monthly_budget_usd": 80, "slack_channel": "#llm-costs", "alert_thresholds": [0.9]},
            },
            "alerting": {
                "slack": {"api_url_file": "/run/secrets/slack_url", "channel": "#llm-costs"},
                "discord": {"url": "https://discord.example/api/webhooks/1/abc"},
                "webhook": {"url": "https://hooks.example/tokenfuse"},
                "group_wait": "10s",
                "group_interval": "2m",
                "repeat_interval": "6h",
                **alerting,
            },
        }
    )


def _no_slack_config() -> Config:
    return parse_config(
        {
            "departments": {"research": {"monthly_budget_usd": 50}},
            "alerting": {"webhook": {"url": "https://hooks.example/tokenfuse"}},
        }
    )


def _amtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("amtool"), *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def _routes_to(config_path: Path, labels: dict[str, str]) -> list[str]:
    """Receivers amtool resolves for a label set (in routing order)."""
    result = _amtool(
        "config", "routes", "test", f"--config.file={config_path}", *(f"{k}={v}" for k, v in labels.items())
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().split(",")


def _write(tmp_path: Path, config: Config) -> Path:
    path = tmp_path / "alertmanager.yml"
    path.write_text(render_alertmanager(config), encoding="utf-8")
    return path


def test_checked_in_config_matches_the_example_config() -> None:
    """alerting-rules/alertmanager.yml is exactly what `tokenfuse alertmanager` renders for examples/tokenfuse.yaml."""
    assert CHECKED_IN.read_text(encoding="utf-8") == render_alertmanager(load_config(EXAMPLE_CONFIG)), (
        "alerting-rules/alertmanager.yml is stale; regenerate it with\n"
        "  tokenfuse alertmanager --config examples/tokenfuse.yaml -o alerting-rules/alertmanager.yml\n"
        "and update alerting-rules/route-tests.yml if the routing changed"
    )


def test_cli_writes_what_render_alertmanager_returns(tmp_path: Path) -> None:
    """`tokenfuse alertmanager --config FILE -o OUT` writes render_alertmanager(FILE) to OUT."""
    out = tmp_path / "am.yml"
    assert cli_main(["alertmanager", "--config", str(EXAMPLE_CONFIG), "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_alertmanager(load_config(EXAMPLE_CONFIG))


def test_amtool_accepts_checked_in_and_generated_configs(tmp_path: Path) -> None:
    """`amtool check-config` passes on the checked-in file, a rich config and one with no notifier at all."""
    paths = [CHECKED_IN]
    for name, config in (
        ("rich", _rich_config()),
        ("no-slack", _no_slack_config()),
        ("nothing", parse_config({"departments": {"a": {"monthly_budget_usd": 1}}})),
    ):
        path = tmp_path / f"{name}.yml"
        path.write_text(render_alertmanager(config), encoding="utf-8")
        paths.append(path)
    for path in paths:
        result = _amtool("check-config", path)
        assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"


def test_checked_in_route_cases_reach_their_receivers() -> None:
    """Each case in alerting-rules/route-tests.yml routes (amtool --verify.receivers) to exactly its receivers."""
    cases = yaml.safe_load(ROUTE_CASES.read_text(encoding="utf-8"))["cases"]
    for case in cases:
        labels = case["labels"]
        result = _amtool(
            "config",
            "routes",
            "test",
            f"--config.file={CHECKED_IN}",
            f"--verify.receivers={','.join(case['receivers'])}",
            *(f"{k}={v}" for k, v in labels.items()),
        )
        assert result.returncode == 0, f"{labels}: {result.stdout}{result.stderr}"


def test_route_cases_cover_every_department_and_severity() -> None:
    """The checked-in route cases name every example department, `unassigned`, and every severity."""
    cases = yaml.safe_load(ROUTE_CASES.read_text(encoding="utf-8"))["cases"]
    departments = {c["labels"].get("department") for c in cases}
    assert departments >= {*load_config(EXAMPLE_CONFIG).departments, "unassigned"}
    for department in load_config(EXAMPLE_CONFIG).departments:
        severities = {c["labels"]["severity"] for c in cases if c["labels"].get("department") == department}
        assert severities >= {"warning", "critical"}, department


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        ({"department": "marketing", "severity": "info"}, ["slack-marketing"]),
        ({"department": "marketing", "severity": "warning"}, ["slack-marketing"]),
        ({"department": "marketing", "severity": "critical"}, [ESCALATION_RECEIVER, "slack-marketing"]),
        ({"department": "research", "severity": "warning"}, [DEFAULT_RECEIVER]),
        ({"department": "research", "severity": "critical"}, [ESCALATION_RECEIVER, DEFAULT_RECEIVER]),
        ({"department": "ops", "severity": "warning"}, [DEFAULT_RECEIVER]),  # its channel is the default one
        ({"alertname": "TokenfuseExporterDown", "severity": "critical"}, [ESCALATION_RECEIVER, DEFAULT_RECEIVER]),
    ],
)
def test_routes_by_department_and_severity(tmp_path: Path, labels: dict[str, str], receivers: list[str]) -> None:
    """Departments reach their own Slack channel or the default; critical alerts also reach Discord/webhook."""
    assert _routes_to(_write(tmp_path, _rich_config()), labels) == receivers


def test_without_slack_everything_goes_to_the_escalation_receiver(tmp_path: Path) -> None:
    """With only Discord/webhook configured, every alert, whatever its severity, goes there."""
    path = _write(tmp_path, _no_slack_config())
    for severity in ("info", "warning", "critical"):
        assert _routes_to(path, {"department": "research", "severity": severity}) == [ESCALATION_RECEIVER]


def test_slack_receivers_carry_channel_secret_file_resolved_and_templates() -> None:
    """Slack configs read the URL from api_url_file, post to their channel, send resolved, and template the figures."""
    doc = yaml.safe_load(render_alertmanager(_rich_config()))
    receivers = {r["name"]: r for r in doc["receivers"]}
    assert set(receivers) == {DEFAULT_RECEIVER, department_receiver("marketing"), ESCALATION_RECEIVER}
    for name, channel in ((DEFAULT_RECEIVER, "#llm-costs"), (department_receiver("marketing"), "#marketing-llm")):
        (slack,) = receivers[name]["slack_configs"]
        assert slack["api_url_file"] == "/run/secrets/slack_url"
        assert slack["channel"] == channel
        assert slack["send_resolved"] is True
        # The figures come from the alert's description; department, threshold and the dashboard link from labels.
        for needle in (
            ".Annotations.description",
            ".Labels.department",
            ".Labels.threshold",
            ".Annotations.dashboard_url",
        ):
            assert needle in slack["text"], needle
    escalation = receivers[ESCALATION_RECEIVER]
    assert escalation["discord_configs"][0]["webhook_url"] == "https://discord.example/api/webhooks/1/abc"
    assert escalation["webhook_configs"] == [{"url": "https://hooks.example/tokenfuse", "send_resolved": True}]


def test_grouping_and_timing_come_from_the_config() -> None:
    """One group per alert, department and threshold; group_wait/interval/repeat from alerting; info repeats daily."""
    route = yaml.safe_load(render_alertmanager(_rich_config()))["route"]
    assert route["group_by"] == ["alertname", "department", "threshold"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == ("10s", "2m", "6h")
    assert {"matchers": ['severity="info"'], "repeat_interval": "1d"} in route["routes"]


def _matchers(matchers: list[str]) -> dict[str, tuple[str, str]]:
    """``['severity!="critical"']`` → ``{"severity": ("!=", "critical")}``, with the matcher escapes undone."""
    out = {}
    for m in matchers:
        match = re.fullmatch(r'(\w+)(=~|!=|=)"(.*)"', m)
        assert match, m
        out[match[1]] = (match[2], match[3].replace("\\\\", "\\"))
    return out


def test_higher_thresholds_inhibit_lower_ones_across_all_configured_thresholds() -> None:
    """Each threshold inhibits every lower one (union over departments) of the same department; an open fuse too."""
    rules = yaml.safe_load(render_alertmanager(_rich_config()))["inhibit_rules"]
    assert all(rule["equal"] == ["department"] for rule in rules)
    silenced_below: dict[str, set[str]] = {}
    fuse_targets = []
    for rule in rules:
        source, target = _matchers(rule["source_matchers"]), _matchers(rule["target_matchers"])
        if source["alertname"] == ("=", "TokenfuseFuseOpen"):
            fuse_targets.append(target)
            continue
        assert source["alertname"] == target["alertname"] == ("=", "TokenfuseBudgetThreshold")
        op, pattern = target["threshold"]
        assert op == "=~"
        # Prometheus-style regexes are anchored; "1205" shows the dot of 12.5 is escaped.
        silenced_below[source["threshold"][1]] = {
            t for t in ("12.5", "1205", "50", "75", "90", "100") if re.fullmatch(pattern, t)
        }
    assert silenced_below == {
        "50": {"12.5"},
        "75": {"12.5", "50"},
        "90": {"12.5", "50", "75"},
        "100": {"12.5", "50", "75", "90"},
    }
    assert fuse_targets == [
        {
            "alertname": ("=~", "TokenfuseBudgetThreshold|TokenfuseHourlyTokenLimit"),
            "severity": ("!=", "critical"),
        }
    ]


def test_no_notifier_configured_gives_a_silent_root_receiver() -> None:
    """Without Slack, Discord or webhook the config still loads, routing everything to a receiver that sends nothing."""
    doc = yaml.safe_load(render_alertmanager(parse_config({})))
    assert doc["route"]["receiver"] == NULL_RECEIVER
    assert doc["receivers"] == [{"name": NULL_RECEIVER}]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"alerting": {"discord": {"url_file": "/run/secrets/discord"}}}, "alerting.discord.url_file"),
        ({"alerting": {"webhook": {"url_file": "/run/secrets/hook"}}}, "alerting.webhook.url_file"),
        ({"departments": {"a": {"slack_channel": "#a"}}}, "departments.a.slack_channel"),
    ],
)
def test_unusable_alerting_config_is_an_error_naming_the_field(data: dict[str, Any], field: str) -> None:
    """Settings the generated Alertmanager config cannot honour raise ConfigError naming the field."""
    with pytest.raises(ConfigError) as e:
        render_alertmanager(parse_config(data))
    assert str(e.value).startswith(field + ":")
