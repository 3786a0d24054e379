"""The report's readers: a month's usage as `UsageRow`s from the local ledger (exact, one process) or from
Prometheus (every scraped replica), with the client and PromQL of `tokenfuse.policies.promql`.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tokenfuse.config import Config
from tokenfuse.policies.calendar import Period
from tokenfuse.policies.ledger import Ledger, LedgerError
from tokenfuse.policies.promql import CHARGEBACK_LABELS, PrometheusClient, PrometheusError
from tokenfuse.policies.promql import month_usage as prometheus_queries
from tokenfuse.report.build import UsageRow

__all__ = ["ReportError", "prometheus_queries", "read_local", "read_prometheus"]


class ReportError(RuntimeError):
    """The report cannot be made from this source (no ledger file, Prometheus unreachable or answering garbage)."""


def read_local(config: Config, period: Period, *, now: float | None = None) -> list[UsageRow]:
    """The month's usage from the local ledger at ``policy.state_path`` (exact: one row per metered call).

    Args:
        config: where the ledger is and its time zone.
        period: the month.
        now: UNIX time (opening the ledger loads the rolling window as of then).

    Raises:
        ReportError: there is no ledger file, or it cannot be read.
    """
    path = config.policy.state_path
    if path != ":memory:" and not Path(path).is_file():
        raise ReportError(
            f"policy.state_path: no ledger at {path}; run the report where the gateway keeps its state, "
            "or use --source prometheus"
        )
    ledger = Ledger(path, zone=config.zone, window_seconds=config.policy.token_window)
    try:
        ledger.open(time.time() if now is None else now)
        totals = ledger.month_totals(period)
    except LedgerError as e:
        raise ReportError(str(e)) from None
    finally:
        ledger.close()
    # The ledger stores only calls that reported usage, which the meter records only for successful calls.
    return [
        UsageRow(
            department=str(t["department"]),
            project=str(t["project"]),
            provider=str(t["provider"]),
            model=str(t["model"]),
            input_tokens=int(t["input_tokens"]),
            output_tokens=int(t["output_tokens"]),
            cost_usd=float(t["cost_usd"]),
            requests=int(t["requests"]),
        )
        for t in totals
    ]


def read_prometheus(
    url: str,
    period: Period,
    *,
    now: float | None = None,
    timeout: float = 10.0,
    client: httpx.Client | None = None,
) -> list[UsageRow]:
    """The month's usage from a Prometheus-compatible ``/api/v1/query`` (the sum over every scraped replica).

    ``increase`` extrapolates to the range ends, so figures for series that grew during the month may differ from
    the ledger by up to about one scrape interval's worth of traffic; token and request counts are rounded.

    Args:
        url: base URL (``http://prometheus:9090``).
        period: the month.
        now: UNIX time (default: now).
        timeout: seconds per query.
        client: an httpx client to use (tests); by default one is made and closed.

    Raises:
        ReportError: Prometheus cannot be reached or does not answer a vector.
    """
    plan = prometheus_queries(period, time.time() if now is None else now)
    if plan is None:
        return []
    at, queries = plan
    acc: dict[tuple[str, ...], dict[str, float]] = {}
    with PrometheusClient(url, timeout=timeout, client=client) as prometheus:
        for key, qs in queries.items():
            for q in qs:
                try:
                    samples = prometheus.query(q, at)
                except PrometheusError as e:
                    raise ReportError(str(e)) from None
                for sample in samples:
                    if sample.value <= 0:
                        continue
                    labels = tuple(sample.labels.get(name, "") for name in CHARGEBACK_LABELS)
                    slot = acc.setdefault(labels, {})
                    slot[key] = slot.get(key, 0.0) + sample.value
    return [
        UsageRow(
            department=k[0],
            project=k[1],
            provider=k[2],
            model=k[3],
            input_tokens=round(v.get("input", 0.0)),
            output_tokens=round(v.get("output", 0.0)),
            cost_usd=v.get("cost", 0.0),
            requests=round(v.get("requests", 0.0)),
        )
        for k, v in sorted(acc.items())
    ]
