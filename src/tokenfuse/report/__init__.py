"""The monthly chargeback report (`tokenfuse report`): per department, project or model, what a month cost.

`readers` turn a source (the local ledger, or Prometheus) into `UsageRow`s; `build_chargeback` aggregates them
(pure); `formats` renders the result (pure, no I/O); `run_report` is the command that chains the three.
"""

from __future__ import annotations

import sys
from typing import TextIO, cast, get_args

from tokenfuse.config import Config, ConfigError
from tokenfuse.policies.calendar import parse_period
from tokenfuse.report.build import Breakdown, Chargeback, ChargebackRow, UsageRow, build_chargeback
from tokenfuse.report.formats import (
    ReportFormat,
    format_csv,
    format_json,
    format_markdown,
    format_report,
    format_table,
)
from tokenfuse.report.readers import ReportError, prometheus_queries, read_local, read_prometheus

__all__ = [
    "Breakdown",
    "Chargeback",
    "ChargebackRow",
    "ReportError",
    "UsageRow",
    "build_chargeback",
    "format_csv",
    "format_json",
    "format_markdown",
    "format_report",
    "format_table",
    "prometheus_queries",
    "read_local",
    "read_prometheus",
    "run_report",
]


def run_report(
    config: Config,
    month: str,
    source: str | None,
    fmt: str,
    by: str,
    out: TextIO,
    *,
    now: float | None = None,
    err: TextIO | None = None,
) -> int:
    """`tokenfuse report`: read a month's usage, aggregate it, and write it in the chosen format.

    Args:
        config: the validated config (departments, budgets, time zone, ledger path, Prometheus URL).
        month: ``YYYY-MM``, a calendar month in ``config.timezone``.
        source: ``local`` or ``prometheus``; None = ``policy.source``.
        fmt: ``table``, ``csv``, ``json`` or ``markdown``.
        by: ``department``, ``project`` or ``model``.
        out: where the report goes.
        now: UNIX time (default: now); decides how much of the current month there is.
        err: where errors go (default: stderr).

    Returns:
        0, or 2 after printing why to ``err`` (bad month, format or breakdown; no ledger; Prometheus unreachable).

    Raises:
        ConfigError: ``--source prometheus`` without ``policy.prometheus_url``.
    """
    errors = sys.stderr if err is None else err
    src = config.policy.source if source is None else source
    try:
        period = parse_period(month, config.zone)
        if by not in get_args(Breakdown):
            raise ValueError(f"--by {by!r} must be one of department, project, model")
        if fmt not in get_args(ReportFormat):
            raise ValueError(f"--format {fmt!r} must be one of {', '.join(get_args(ReportFormat))}")
        if src == "local":
            usage = read_local(config, period, now=now)
        elif src == "prometheus":
            url = config.policy.prometheus_url
            if not url:
                raise ConfigError(
                    "policy.prometheus_url: required for --source prometheus (e.g. http://127.0.0.1:9090)",
                    code="report_needs_prometheus_url",
                )
            usage = read_prometheus(url, period, now=now)
        else:
            raise ValueError(f"--source {src!r} must be local or prometheus")
    except (ValueError, ReportError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"tokenfuse report: {e}", file=errors)
        return 2
    report = build_chargeback(usage, config, period, by=cast(Breakdown, by), source=src)
    out.write(format_report(report, fmt))
    return 0
