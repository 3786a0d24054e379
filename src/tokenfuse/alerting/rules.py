"""Prometheus recording and alerting rules generated from a `Config` (`tokenfuse rules`).

Owns the PromQL of every tokenfuse alert, its labels and its annotation templates; metric names come from
`tokenfuse.exporter.metrics`, thresholds, budgets and limits from the config.
"""

from __future__ import annotations

from typing import Any

import yaml

from tokenfuse.config import UNASSIGNED, Config, Department, format_duration
from tokenfuse.exporter.metrics import (
    BREAKER_STATE,
    BUDGET_LIMIT_USD,
    BUDGET_SPENT_USD,
    COST_USD_TOTAL,
    POLICY_SOURCE_UP,
    TOKEN_LIMIT,
    TOKENS_TOTAL,
    UNPRICED_REQUESTS_TOTAL,
)

__all__ = [
    "ALERT_NAMES",
    "DEFAULT_JOB",
    "FORECAST_LONG_WINDOW",
    "FORECAST_SHORT_WINDOW",
    "RECORDED",
    "dump_yaml",
    "render_rules",
    "severity_for",
    "threshold_label",
]

DEFAULT_JOB = "tokenfuse"
"""Prometheus ``job`` of the scrape config that scrapes tokenfuse exporters; `TokenfuseExporterDown` watches it."""

FORECAST_LONG_WINDOW = "6h"
"""Burn-rate window that decides the forecast: long enough that one burst does not move it much."""
FORECAST_SHORT_WINDOW = "30m"
"""Second window: the burn must still be going on, so the alert clears soon after spending slows down."""
_FORECAST_FOR = "15m"

ALERT_NAMES = (
    "TokenfuseBudgetThreshold",
    "TokenfuseBudgetExhaustionForecast",
    "TokenfuseHourlyTokenLimit",
    "TokenfuseFuseOpen",
    "TokenfuseUnassignedSpend",
    "TokenfuseUnpricedModel",
    "TokenfuseExporterDown",
    "TokenfusePolicySourceDown",
)
"""Every alert `render_rules` can emit; each has a section in docs/runbook.md."""


# Recording-rule convention (level:metric:operations) drops a counter's _total once it is rated.
_COST = COST_USD_TOTAL.removesuffix("_total")
_TOKENS = TOKENS_TOTAL.removesuffix("_total")


class _Recorded:
    """Names of the recording rules, so alerts, templates and dashboards spell them once."""

    spent = f"department:{BUDGET_SPENT_USD}:max"
    limit = f"department:{BUDGET_LIMIT_USD}:max"
    used_percent = "department:tokenfuse_budget_used:percent"
    remaining = "department:tokenfuse_budget_remaining_usd:max"
    cost_rate5m = f"department:{_COST}:rate5m"
    tokens_rate5m = f"department:{_TOKENS}:rate5m"
    month_remaining = "tokenfuse:month_remaining_seconds"
    token_limit = f"department:{TOKEN_LIMIT}:max"

    @staticmethod
    def cost_rate(window: str) -> str:
        """USD per second over ``window``, summed over replicas, e.g. ``department:tokenfuse_cost_usd:rate6h``."""
        return f"department:{_COST}:rate{window}"

    @staticmethod
    def tokens_increase(window: str) -> str:
        """Tokens in the last ``window``, summed over replicas, e.g. ``department:tokenfuse_tokens:increase1h``."""
        return f"department:{_TOKENS}:increase{window}"


RECORDED = _Recorded
"""The recording-rule names (``RECORDED.spent``, ``RECORDED.cost_rate("6h")``, …) for dashboards and tests."""


def threshold_label(fraction: float) -> str:
    """The ``threshold`` label value of a budget fraction: ``0.9`` → ``"90"``, ``0.125`` → ``"12.5"``.

    Args:
        fraction: a threshold from ``Department.alert_thresholds``.
    """
    return f"{round(fraction * 100, 4):g}"


def severity_for(fraction: float) -> str:
    """Severity of a budget threshold: below 75% ``info``, below 100% ``warning``, else ``critical``.

    Args:
        fraction: a threshold from ``Department.alert_thresholds``.
    """
    if fraction < 0.75:
        return "info"
    if fraction < 1.0:
        return "warning"
    return "critical"


def _sel(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _value(expr_template: str, fmt: str, missing: str = "?") -> str:
    """A Go-template snippet that runs ``expr_template`` (with ``%q`` for the alert's department) and prints it."""
    query = f"printf {_go_quote(expr_template)} $labels.department | query"
    return f'{{{{ with {query} }}}}{{{{ . | first | value | printf "{fmt}" }}}}{{{{ else }}}}{missing}{{{{ end }}}}'


def _go_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dashboard(config: Config, per_department: bool) -> str:
    url = config.alerting.dashboard_url
    if not per_department:
        return url
    return url + ("&" if "?" in url else "?") + "var-department={{ $labels.department }}"


def _annotations(config: Config, alert: str, summary: str, description: str, per_department: bool) -> dict[str, str]:
    return {
        "summary": summary,
        "description": description,
        "runbook_url": f"{config.alerting.runbook_url}#{alert.lower()}",
        "dashboard_url": _dashboard(config, per_department),
    }


def _recording_rules(config: Config) -> list[dict[str, Any]]:
    token_window = format_duration(config.policy.token_window)
    r = RECORDED
    month = _sel(period="month")
    rules: list[dict[str, Any]] = [
        # Every replica exports the same department gauges, so max (not sum) is the department's value.
        {"record": r.spent, "expr": f"max by (department) ({BUDGET_SPENT_USD}{month})"},
        {"record": r.limit, "expr": f"max by (department) ({BUDGET_LIMIT_USD}{month})"},
        # 100 * spent / limit (not spent / limit * 100) keeps a spend of exactly 90% at exactly 90.
        {"record": r.used_percent, "expr": f"100 * {r.spent} / {r.limit}"},
        {"record": r.remaining, "expr": f"{r.limit} - {r.spent}"},
        {"record": r.cost_rate5m, "expr": f"sum by (department) (rate({COST_USD_TOTAL}[5m]))"},
        {"record": r.tokens_rate5m, "expr": f"sum by (department) (rate({TOKENS_TOTAL}[5m]))"},
    ]
    for window in (FORECAST_SHORT_WINDOW, FORECAST_LONG_WINDOW):
        # Counters are per replica, so the department's rate is their sum.
        rules.append({"record": r.cost_rate(window), "expr": f"sum by (department) (rate({COST_USD_TOTAL}[{window}]))"})
    rules += [
        {
            "record": r.tokens_increase(token_window),
            "expr": f"sum by (department) (increase({TOKENS_TOTAL}[{token_window}]))",
        },
        {"record": r.token_limit, "expr": f"max by (department) ({TOKEN_LIMIT}{_sel(window=token_window)})"},
        # PromQL has no time zones: the month ends at midnight UTC, a few hours off config.timezone at most.
        {
            "record": r.month_remaining,
            "expr": "(days_in_month() - day_of_month() + 1) * 86400 - hour() * 3600 - minute() * 60",
        },
    ]
    return rules


def _threshold_rules(config: Config, name: str, dept: Department) -> list[dict[str, Any]]:
    r = RECORDED
    spent = _value(f"{r.spent}{{department=%q}}", "%.2f")
    limit = _value(f"{r.limit}{{department=%q}}", "%.2f")
    # Floored, so a message never claims a threshold the spend has not reached (89.998% reads 89%, not 90%).
    percent = _value(f"floor({r.used_percent}{{department=%q}})", "%.0f")
    rules = []
    for t in dept.alert_thresholds:
        pct = threshold_label(t)
        rules.append(
            {
                "alert": "TokenfuseBudgetThreshold",
                "expr": f"{r.used_percent}{_sel(department=name)} >= {pct}",
                # The department label is redundant with the expression, but without it the rules of two
                # departments with the same threshold are duplicates to `promtool check rules --lint-fatal`.
                "labels": {"department": name, "severity": severity_for(t), "threshold": pct},
                "annotations": _annotations(
                    config,
                    "TokenfuseBudgetThreshold",
                    f"{{{{ $labels.department }}}} has used {pct}% of its monthly LLM budget",
                    f"{{{{ $labels.department }}}} has spent ${spent} of ${limit} ({percent}%) this month.",
                    per_department=True,
                ),
            }
        )
    return rules


def _forecast_rule(config: Config) -> dict[str, Any]:
    r = RECORDED
    long_rate, short_rate = r.cost_rate(FORECAST_LONG_WINDOW), r.cost_rate(FORECAST_SHORT_WINDOW)
    # Value = seconds until the budget is gone at the long-window rate; a zero rate gives +Inf, which never fires.
    expr = (
        f"(\n  {r.remaining} / {long_rate} < scalar({r.month_remaining})\n  and {r.remaining} > 0\n)\n"
        f"and\n({r.remaining} / {short_rate} < scalar({r.month_remaining}))"
    )
    per_hour_long = _value(f"3600 * {long_rate}{{department=%q}}", "%.2f")
    per_hour_short = _value(f"3600 * {short_rate}{{department=%q}}", "%.2f")
    left = _value(f"{r.remaining}{{department=%q}}", "%.2f")
    limit = _value(f"{r.limit}{{department=%q}}", "%.2f")
    return {
        "alert": "TokenfuseBudgetExhaustionForecast",
        "expr": expr,
        "for": _FORECAST_FOR,
        "labels": {"severity": "warning"},
        "annotations": _annotations(
            config,
            "TokenfuseBudgetExhaustionForecast",
            "{{ $labels.department }} will run out of its monthly LLM budget before the month ends",
            f"At the burn rate of the last {FORECAST_LONG_WINDOW} (${per_hour_long}/h; last {FORECAST_SHORT_WINDOW}: "
            f"${per_hour_short}/h) {{{{ $labels.department }}}} spends the ${left} left of its ${limit} budget "
            "in {{ humanizeDuration $value }}, before the month ends (UTC).",
            per_department=True,
        ),
    }


def _alerting_rules(config: Config, job: str) -> list[dict[str, Any]]:
    r = RECORDED
    token_window = format_duration(config.policy.token_window)
    spent = _value(f"{r.spent}{{department=%q}}", "%.2f")
    limit = _value(f"{r.limit}{{department=%q}}", "%.2f")
    token_limit = _value(f"{r.token_limit}{{department=%q}}", "%.0f")
    rules: list[dict[str, Any]] = []
    for name, dept in config.departments.items():
        if dept.monthly_budget_usd is not None:
            rules += _threshold_rules(config, name, dept)
    rules.append(_forecast_rule(config))
    rules.append(
        {
            "alert": "TokenfuseHourlyTokenLimit",
            "expr": f"{r.tokens_increase(token_window)} >= on (department) {r.token_limit}",
            "labels": {"severity": "warning"},
            "annotations": _annotations(
                config,
                "TokenfuseHourlyTokenLimit",
                f"{{{{ $labels.department }}}} is at its {token_window} token limit",
                f'{{{{ $labels.department }}}} used {{{{ printf "%.0f" $value }}}} tokens in the last {token_window}, '
                f"at or over its limit of {token_limit}; its fuse opens and requests are refused.",
                per_department=True,
            ),
        }
    )
    rules.append(
        {
            "alert": "TokenfuseFuseOpen",
            "expr": f"max by (department) ({BREAKER_STATE}{_sel(state='open')}) == 1",
            "labels": {"severity": "critical"},
            "annotations": _annotations(
                config,
                "TokenfuseFuseOpen",
                "The fuse of {{ $labels.department }} is open: its LLM requests are refused",
                "tokenfuse answers requests from {{ $labels.department }} with HTTP 429 until the fuse closes. "
                f"Month-to-date spend: ${spent} of ${limit}.",
                per_department=True,
            ),
        }
    )
    rules.append(
        {
            "alert": "TokenfuseUnassignedSpend",
            "expr": f"sum by (department) (increase({COST_USD_TOTAL}{_sel(department=UNASSIGNED)}[1h])) > 0",
            "labels": {"severity": "warning"},
            "annotations": _annotations(
                config,
                "TokenfuseUnassignedSpend",
                "LLM spend that no department owns",
                '${{ printf "%.2f" $value }} was spent in the last hour by calls without a known department '
                "(no key, or a key no department lists); no budget covers it.",
                per_department=False,
            ),
        }
    )
    rules.append(
        {
            "alert": "TokenfuseUnpricedModel",
            "expr": f"sum by (provider, model) (increase({UNPRICED_REQUESTS_TOTAL}[1h])) > 0",
            "labels": {"severity": "warning"},
            "annotations": _annotations(
                config,
                "TokenfuseUnpricedModel",
                "No price for {{ $labels.provider }} model {{ $labels.model }}",
                '{{ printf "%.0f" $value }} requests in the last hour used {{ $labels.model }} '
                "({{ $labels.provider }}), which has no known price: they were costed at $0, so budgets "
                "under-count. Add pricing.overrides.{{ $labels.model }} to tokenfuse.yaml.",
                per_department=False,
            ),
        }
    )
    up = f"up{_sel(job=job)}"
    rules.append(
        {
            "alert": "TokenfuseExporterDown",
            "expr": f"{up} == 0 or absent({up})",
            "for": "2m",
            "labels": {"severity": "critical"},
            "annotations": _annotations(
                config,
                "TokenfuseExporterDown",
                "tokenfuse exporter {{ with $labels.instance }}{{ . }}{{ else }}(job " + job + "){{ end }} is down",
                f"Prometheus cannot scrape job={job}{{{{ with $labels.instance }}}} at {{{{ . }}}}{{{{ end }}}}: "
                "LLM spend is not reaching Prometheus, so budget alerts and dashboards are blind.",
                per_department=False,
            ),
        }
    )
    on_error = config.policy.on_source_error
    consequence = (
        "every request is refused until it answers again"
        if on_error == "fail_closed"
        else "requests pass without budget or token-limit checks until it answers again"
    )
    rules.append(
        {
            "alert": "TokenfusePolicySourceDown",
            "expr": f"{POLICY_SOURCE_UP} == 0",
            # After max_staleness the engine stops trusting its last decision: that is when it matters.
            "for": format_duration(max(config.policy.max_staleness, 60.0)),
            "labels": {"severity": "critical" if on_error == "fail_closed" else "warning"},
            "annotations": _annotations(
                config,
                "TokenfusePolicySourceDown",
                "Policy rate source {{ $labels.source }} is not answering",
                "{{ with $labels.instance }}{{ . }}: {{ end }}the policy engine cannot read rates from "
                f"{{{{ $labels.source }}}}; it is configured {on_error}, so {consequence}.",
                per_department=False,
            ),
        }
    )
    return rules


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so PromQL and templates stay readable in review; no YAML aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def dump_yaml(data: object) -> str:
    """YAML as tokenfuse generators write it: key order kept, block strings, no line wrapping, no aliases.

    Args:
        data: plain mappings, lists and scalars.
    """
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=1_000_000, allow_unicode=True)


def render_rules(config: Config, *, job: str = DEFAULT_JOB) -> str:
    """Render the Prometheus rule file: department recording rules and every tokenfuse alert.

    Args:
        config: the validated tokenfuse.yaml.
        job: the Prometheus ``job`` label of the scrape config for the tokenfuse exporters (gateways and
            instrumented apps); `TokenfuseExporterDown` fires when it is down or absent.

    Returns:
        The rule file text, for ``promtool check rules`` and Prometheus ``rule_files``.
    """
    doc = {
        "groups": [
            {"name": "tokenfuse.department", "rules": _recording_rules(config)},
            {"name": "tokenfuse.alerts", "rules": _alerting_rules(config, job)},
        ]
    }
    header = (
        "# Generated by `tokenfuse rules` from tokenfuse.yaml: do not edit; change the config and regenerate.\n"
        "# Check with `promtool check rules --lint-fatal` and `promtool test rules alerting-rules/tests/*.yml`.\n"
    )
    return header + dump_yaml(doc)
