"""The Alertmanager configuration generated from `Config.alerting` and the departments (`tokenfuse alertmanager`).

Owns receivers (Slack per channel, optional Discord and webhook escalation), the routing tree by department and
severity, the inhibition that lets only the highest budget threshold speak, and the Slack message templates.
"""

from __future__ import annotations

import re
from typing import Any

from tokenfuse.alerting.rules import dump_yaml, threshold_label
from tokenfuse.config import Config, ConfigError, format_duration

__all__ = [
    "DEFAULT_RECEIVER",
    "ESCALATION_RECEIVER",
    "GROUP_BY",
    "INFO_REPEAT_INTERVAL",
    "NULL_RECEIVER",
    "department_receiver",
    "render_alertmanager",
]

DEFAULT_RECEIVER = "slack-default"
"""Slack receiver posting to ``alerting.slack.channel``: alerts of departments without a channel, and global ones."""
ESCALATION_RECEIVER = "escalation"
"""Discord and/or webhook receiver; critical alerts go here as well as to Slack (only when either is configured)."""
NULL_RECEIVER = "null"
"""Root receiver when no notifier is configured: Alertmanager needs one, it sends nothing."""

GROUP_BY = ("alertname", "department", "threshold")
"""One notification group per alert, department and threshold: each threshold is announced once, on its own."""

INFO_REPEAT_INTERVAL = 86400.0
"""Info alerts (low budget thresholds) repeat at most daily: they inform, nobody has to act within hours."""

_THRESHOLD_ALERT = "TokenfuseBudgetThreshold"
# The fuse already tells the department everything these say, and louder.
_SILENCED_BY_OPEN_FUSE = (_THRESHOLD_ALERT, "TokenfuseHourlyTokenLimit")

_SLACK_TITLE = (
    '[{{ .Status | toUpper }}{{ if eq .Status "firing" }}:{{ .Alerts.Firing | len }}{{ end }}] '
    "{{ with .CommonAnnotations.summary }}{{ . }}{{ else }}{{ .CommonLabels.alertname }}"
    "{{ with .CommonLabels.department }} ({{ . }}){{ end }}{{ end }}"
)
_SLACK_TEXT = """{{ range .Alerts -}}
*{{ .Annotations.summary }}*{{ if eq .Status "resolved" }} (resolved){{ end }}
{{ .Annotations.description }}
{{ with .Labels.department }}department: `{{ . }}`  {{ end }}{{ with .Labels.threshold }}threshold: {{ . }}%  {{ end }}severity: {{ .Labels.severity }}
<{{ .Annotations.dashboard_url }}|Dashboard>  <{{ .Annotations.runbook_url }}|Runbook>
{{ end }}"""
_SLACK_COLOR = (
    '{{ if eq .Status "resolved" }}good{{ else if eq .CommonLabels.severity "critical" }}danger'
    "{{ else }}warning{{ end }}"
)
_DISCORD_MESSAGE = """{{ range .Alerts -}}
**{{ .Annotations.summary }}**{{ if eq .Status "resolved" }} (resolved){{ end }}
{{ .Annotations.description }}
{{ .Annotations.dashboard_url }}
{{ end }}"""


def department_receiver(department: str) -> str:
    """Name of the Slack receiver of a department that has its own ``slack_channel``.

    Args:
        department: a configured department name.
    """
    return f"slack-{department}"


def _matcher(label: str, value: str, op: str = "=") -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{label}{op}"{escaped}"'


def _slack(config: Config, api_url_file: str, channel: str) -> dict[str, Any]:
    dashboard = config.alerting.dashboard_url
    return {
        "api_url_file": api_url_file,
        "channel": channel,
        "send_resolved": True,
        "title": _SLACK_TITLE,
        "title_link": "{{ with .CommonAnnotations.dashboard_url }}{{ . }}{{ else }}" + dashboard + "{{ end }}",
        "text": _SLACK_TEXT,
        "color": _SLACK_COLOR,
        "fallback": _SLACK_TITLE,
    }


def _escalation(config: Config) -> dict[str, Any] | None:
    alerting = config.alerting
    receiver: dict[str, Any] = {"name": ESCALATION_RECEIVER}
    for field, hook in (("discord", alerting.discord), ("webhook", alerting.webhook)):
        if hook is None:
            continue
        if hook.url is None:
            # Alertmanager 0.25 (Debian 12, what the tests run) reads neither discord webhook_url_file nor
            # webhook url_file; writing them would produce a config it rejects.
            raise ConfigError(
                f"alerting.{field}.url_file: Alertmanager 0.25 cannot read this URL from a file; "
                f"give alerting.{field}.url instead",
                code="alerting_url_file_unsupported",
            )
        if field == "discord":
            receiver["discord_configs"] = [
                {
                    "webhook_url": hook.url,
                    "send_resolved": True,
                    "title": _SLACK_TITLE,
                    "message": _DISCORD_MESSAGE,
                }
            ]
        else:
            receiver["webhook_configs"] = [{"url": hook.url, "send_resolved": True}]
    return receiver if len(receiver) > 1 else None


def _receivers(config: Config) -> tuple[list[dict[str, Any]], str, dict[str, str]]:
    """Receivers, the root receiver's name and department → receiver for departments with their own channel."""
    slack = config.alerting.slack
    receivers: list[dict[str, Any]] = []
    own: dict[str, str] = {}
    escalation = _escalation(config)
    if slack is not None:
        receivers.append(
            {"name": DEFAULT_RECEIVER, "slack_configs": [_slack(config, slack.api_url_file, slack.channel)]}
        )
        root = DEFAULT_RECEIVER
        for name, dept in config.departments.items():
            if dept.slack_channel is not None and dept.slack_channel != slack.channel:
                own[name] = department_receiver(name)
                receivers.append(
                    {"name": own[name], "slack_configs": [_slack(config, slack.api_url_file, dept.slack_channel)]}
                )
    else:
        for name, dept in config.departments.items():
            if dept.slack_channel is not None:
                raise ConfigError(
                    f"departments.{name}.slack_channel: set, but alerting.slack is not configured; "
                    "add alerting.slack.api_url_file or remove the channel",
                    code="alerting_slack_missing",
                )
        root = ESCALATION_RECEIVER if escalation is not None else NULL_RECEIVER
        if escalation is None:
            receivers.append({"name": NULL_RECEIVER})
    if escalation is not None:
        receivers.append(escalation)
    return receivers, root, own


def _routes(config: Config, root: str, own: dict[str, str]) -> list[dict[str, Any]]:
    info = {"matchers": [_matcher("severity", "info")], "repeat_interval": format_duration(INFO_REPEAT_INTERVAL)}
    routes: list[dict[str, Any]] = []
    escalate = root != ESCALATION_RECEIVER and any((config.alerting.discord, config.alerting.webhook))
    if escalate:
        routes.append(
            {"receiver": ESCALATION_RECEIVER, "matchers": [_matcher("severity", "critical")], "continue": True}
        )
    for name, receiver in own.items():
        routes.append({"receiver": receiver, "matchers": [_matcher("department", name)], "routes": [dict(info)]})
    routes.append(dict(info))
    if escalate:
        # Once the escalation route has matched, the root receiver no longer applies by default: without this
        # catch-all a critical alert of a department without its own channel would reach Discord only.
        routes.append({"receiver": root})
    return routes


def _inhibit_rules(config: Config) -> list[dict[str, Any]]:
    labels = sorted(
        {t for d in config.departments.values() if d.monthly_budget_usd is not None for t in d.alert_thresholds}
    )
    rules: list[dict[str, Any]] = []
    for i, high in enumerate(labels[1:], start=1):
        lower = "|".join(re.escape(threshold_label(t)) for t in labels[:i])
        rules.append(
            {
                "source_matchers": [
                    _matcher("alertname", _THRESHOLD_ALERT),
                    _matcher("threshold", threshold_label(high)),
                ],
                "target_matchers": [_matcher("alertname", _THRESHOLD_ALERT), _matcher("threshold", lower, "=~")],
                "equal": ["department"],
            }
        )
    rules.append(
        {
            "source_matchers": [_matcher("alertname", "TokenfuseFuseOpen")],
            "target_matchers": [
                _matcher("alertname", "|".join(_SILENCED_BY_OPEN_FUSE), "=~"),
                # The 100% alert stays: it is the one that carries the spend figures.
                _matcher("severity", "critical", "!="),
            ],
            "equal": ["department"],
        }
    )
    return rules


def render_alertmanager(config: Config) -> str:
    """Render alertmanager.yml: Slack receivers per channel, routes by department and severity, inhibitions.

    Critical alerts also go to the Discord / webhook escalation receiver when ``alerting.discord`` or
    ``alerting.webhook`` is configured. Info alerts repeat at most daily. A higher budget threshold silences
    the lower ones of the same department, and an open fuse silences its non-critical budget and token alerts.

    Args:
        config: the validated tokenfuse.yaml.

    Returns:
        The Alertmanager configuration text, for ``amtool check-config`` and ``--config.file``.

    Raises:
        ConfigError: a department has a ``slack_channel`` but ``alerting.slack`` is missing, or a Discord /
            webhook URL is given as ``url_file``, which Alertmanager 0.25 cannot read.
    """
    alerting = config.alerting
    receivers, root, own = _receivers(config)
    doc = {
        "route": {
            "receiver": root,
            "group_by": list(GROUP_BY),
            "group_wait": format_duration(alerting.group_wait),
            "group_interval": format_duration(alerting.group_interval),
            "repeat_interval": format_duration(alerting.repeat_interval),
            "routes": _routes(config, root, own),
        },
        "inhibit_rules": _inhibit_rules(config),
        "receivers": receivers,
    }
    header = (
        "# Generated by `tokenfuse alertmanager` from tokenfuse.yaml: do not edit; change the config and "
        "regenerate.\n# Check with `amtool check-config`; route cases: alerting-rules/route-tests.yml.\n"
    )
    return header + dump_yaml(doc)
