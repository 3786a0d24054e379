"""The monthly chargeback report (`tokenfuse report`): per department, project or model, what a month cost.

Two readers turn a source (the local ledger, or Prometheus) into `UsageRow`s; `build_chargeback` aggregates them
(pure); `format_table` / `format_csv` / `format_json` / `format_markdown` render the result (pure, no I/O).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO, cast, get_args

import httpx

from tokenfuse.config import Config, ConfigError
from tokenfuse.exporter.metrics import COST_USD_TOTAL, REQUESTS_TOTAL, TOKENS_TOTAL
from tokenfuse.policies.fuse import Period, parse_period
from tokenfuse.policies.ledger import Ledger, LedgerError

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

Breakdown = Literal["department", "project", "model"]
ReportFormat = Literal["table", "csv", "json", "markdown"]

# The columns naming a row, per breakdown. Projects are per department (a project label is not unique across them).
_KEYS: Mapping[str, tuple[str, ...]] = {
    "department": ("department",),
    "project": ("department", "project"),
    "model": ("provider", "model"),
}
_GROUP = ("department", "project", "provider", "model")
_SUCCESS = "success"


class ReportError(RuntimeError):
    """The report cannot be made from this source (no ledger file, Prometheus unreachable or answering garbage)."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """What one source says one label set used in the month.

    Args:
        department: department label.
        project: project label.
        provider: provider label.
        model: model label.
        input_tokens: billable input tokens.
        output_tokens: billable output tokens.
        cost_usd: cost in USD.
        requests: billed requests (successful calls; blocked and failed ones are not billed).
    """

    department: str
    project: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    requests: int


@dataclass(frozen=True, slots=True)
class ChargebackRow:
    """One line of the report.

    Args:
        key: the values of `Chargeback.key_columns` (``("marketing",)``, ``("marketing", "web")``, …).
        cost_usd: cost in USD.
        share: fraction of the report's total cost (0 when the total is 0).
        input_tokens: billable input tokens.
        output_tokens: billable output tokens.
        requests: billed requests.
        budget_usd: the department's monthly budget (department breakdown only; None = no budget).
        utilization: cost / budget; on the total line, the budgeted departments' cost / the sum of their budgets
            (departments without a budget are left out of both); None without a budget.
    """

    key: tuple[str, ...]
    cost_usd: float
    share: float
    input_tokens: int
    output_tokens: int
    requests: int
    budget_usd: float | None = None
    utilization: float | None = None

    @property
    def avg_cost_usd(self) -> float | None:
        """Cost per billed request; None without requests."""
        return self.cost_usd / self.requests if self.requests else None


@dataclass(frozen=True, slots=True)
class Chargeback:
    """A month's chargeback, ready to render.

    Args:
        period: the month (``YYYY-MM``, calendar month in ``timezone``).
        timezone: IANA zone of the month's bounds.
        start: UNIX time of the month's first instant.
        end: UNIX time of the next month's first instant.
        source: ``local`` or ``prometheus``.
        by: the breakdown.
        rows: the lines, most expensive first.
        total: the sum of every line (its ``key`` is ``("TOTAL",)``; budget = sum of the budgets shown).
    """

    period: str
    timezone: str
    start: float
    end: float
    source: str
    by: Breakdown
    rows: tuple[ChargebackRow, ...]
    total: ChargebackRow

    @property
    def key_columns(self) -> tuple[str, ...]:
        return _KEYS[self.by]


# -- aggregation (pure) ----------------------------------------------------------------------------------


def build_chargeback(
    usage: Iterable[UsageRow],
    config: Config,
    period: Period,
    *,
    by: Breakdown = "department",
    source: str = "local",
) -> Chargeback:
    """Aggregate usage rows into report lines with shares, budgets and utilization.

    Args:
        usage: what the source read for the month.
        config: departments and their budgets; every configured department gets a line in the department breakdown,
            even one that spent nothing (a chargeback names everyone who could have been charged).
        period: the month.
        by: ``department``, ``project`` or ``model``.
        source: the source's name, shown in the report.
    """
    if by not in _KEYS:
        raise ValueError(f"by {by!r} must be one of department, project, model")
    cols = _KEYS[by]
    sums: dict[tuple[str, ...], list[float]] = {}
    if by == "department":
        for name in config.departments:
            sums[(name,)] = [0.0, 0, 0, 0]
    for u in usage:
        key = tuple(getattr(u, c) for c in cols)
        acc = sums.setdefault(key, [0.0, 0, 0, 0])
        acc[0] += u.cost_usd
        acc[1] += u.input_tokens
        acc[2] += u.output_tokens
        acc[3] += u.requests
    total_cost = math.fsum(v[0] for v in sums.values())

    def budget(key: tuple[str, ...]) -> float | None:
        d = config.departments.get(key[0]) if by == "department" else None
        return None if d is None else d.monthly_budget_usd

    rows = [
        ChargebackRow(
            key=k,
            cost_usd=v[0],
            share=v[0] / total_cost if total_cost > 0 else 0.0,
            input_tokens=int(v[1]),
            output_tokens=int(v[2]),
            requests=int(v[3]),
            budget_usd=budget(k),
            utilization=v[0] / b if (b := budget(k)) else None,
        )
        for k, v in sums.items()
    ]
    rows.sort(key=lambda r: (-r.cost_usd, r.key))
    budgeted = [r for r in rows if r.budget_usd is not None]
    budget_sum = math.fsum(r.budget_usd or 0.0 for r in budgeted)
    total = ChargebackRow(
        key=("TOTAL",),
        cost_usd=total_cost,
        share=1.0 if total_cost > 0 else 0.0,
        input_tokens=sum(r.input_tokens for r in rows),
        output_tokens=sum(r.output_tokens for r in rows),
        requests=sum(r.requests for r in rows),
        budget_usd=budget_sum if budgeted else None,
        utilization=math.fsum(r.cost_usd for r in budgeted) / budget_sum if budgeted else None,
    )
    return Chargeback(
        period=period.name,
        timezone=config.timezone,
        start=period.start,
        end=period.end,
        source=source,
        by=by,
        rows=tuple(rows),
        total=total,
    )


# -- rendering (pure) ------------------------------------------------------------------------------------

_NUMBER_HEADERS = (
    "cost_usd",
    "share",
    "input_tokens",
    "output_tokens",
    "requests",
    "avg_cost_usd",
    "budget_usd",
    "utilization",
)


def _record(report: Chargeback, row: ChargebackRow) -> dict[str, Any]:
    out: dict[str, Any] = dict(zip(report.key_columns, row.key, strict=False))
    out.update(
        cost_usd=row.cost_usd,
        share=row.share,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        requests=row.requests,
        avg_cost_usd=row.avg_cost_usd,
    )
    if report.by == "department":
        out.update(budget_usd=row.budget_usd, utilization=row.utilization)
    return out


def _headers(report: Chargeback) -> list[str]:
    nums = _NUMBER_HEADERS if report.by == "department" else _NUMBER_HEADERS[:6]
    return [*report.key_columns, *nums]


def format_json(report: Chargeback) -> str:
    """The report as one JSON document: month, bounds, source, ``rows`` and ``total`` (fractions, not percents).

    Args:
        report: the chargeback.
    """
    doc = {
        "period": report.period,
        "timezone": report.timezone,
        "from": _iso(report.start, report.timezone),
        "to": _iso(report.end, report.timezone),
        "source": report.source,
        "by": report.by,
        "rows": [_record(report, r) for r in report.rows],
        "total": {k: v for k, v in _record(report, report.total).items() if k not in report.key_columns},
    }
    return json.dumps(doc, indent=2) + "\n"


def format_csv(report: Chargeback) -> str:
    """The report as CSV for a spreadsheet: a header line, one line per row, no total line (so column sums are right).

    Numbers are plain (no currency sign or thousands separator); ``share`` and ``utilization`` are fractions (0.25 =
    25 %); an unknown value (no budget, no requests) is an empty cell.

    Args:
        report: the chargeback.
    """
    buf = io.StringIO()
    headers = _headers(report)
    w = csv.DictWriter(buf, fieldnames=headers, lineterminator="\r\n")
    w.writeheader()
    for row in report.rows:
        rec = _record(report, row)
        w.writerow({h: _plain(rec.get(h)) for h in headers})
    return buf.getvalue()


def _plain(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        # Fixed point, not 1e-06: every spreadsheet locale imports it, and ten places keep sub-cent calls exact enough.
        text = f"{v:.10f}".rstrip("0").rstrip(".")
        return text if text not in ("", "-0") else "0"
    return str(v)


def _money(v: float | None, places: int = 2) -> str:
    if v is None:
        return "-"
    # Sub-cent rows are common in test and trial months; two places would print them all as $0.00.
    if 0 < abs(v) < 1:
        places = max(places, 4)
    return f"${v:,.{places}f}"


def _pct(v: float | None) -> str:
    if v is None:
        return "-"
    return "<0.1%" if 0 < v < 0.0005 else f"{v * 100:.1f}%"


def _cells(report: Chargeback, row: ChargebackRow) -> list[str]:
    cells = [
        *row.key,
        *([""] * (len(report.key_columns) - len(row.key))),
        _money(row.cost_usd),
        _pct(row.share),
        f"{row.input_tokens:,}",
        f"{row.output_tokens:,}",
        f"{row.requests:,}",
        _money(row.avg_cost_usd, 4),
    ]
    if report.by == "department":
        cells += [_money(row.budget_usd), _pct(row.utilization)]
    return cells


_TITLES = {
    "department": "department",
    "project": "project",
    "provider": "provider",
    "model": "model",
    "cost_usd": "cost",
    "share": "share",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
    "requests": "requests",
    "avg_cost_usd": "avg/request",
    "budget_usd": "budget",
    "utilization": "utilization",
}


def _title(report: Chargeback) -> str:
    return (
        f"Chargeback {report.period} ({report.timezone}, {_iso(report.start, report.timezone)} to "
        f"{_iso(report.end, report.timezone)}), by {report.by}, source {report.source}"
    )


def format_table(report: Chargeback) -> str:
    """The report as an aligned plain-text table for a terminal (labels left, numbers right, a total line).

    Args:
        report: the chargeback.
    """
    headers = [_TITLES[h] for h in _headers(report)]
    body = [_cells(report, r) for r in report.rows]
    total = _cells(report, report.total)
    widths = [max(len(c[i]) for c in (headers, *body, total)) for i in range(len(headers))]
    nkeys = len(report.key_columns)

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(w) if i < nkeys else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [_title(report), "", line(headers), rule, *(line(c) for c in body), rule, line(total)]
    return "\n".join(out) + "\n"


def format_markdown(report: Chargeback) -> str:
    """The report as a GitHub-flavoured Markdown table with a bold total line.

    Args:
        report: the chargeback.
    """
    headers = [_TITLES[h] for h in _headers(report)]
    nkeys = len(report.key_columns)
    align = ["---" if i < nkeys else "---:" for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    total = [f"**{c}**" if c else "" for c in _cells(report, report.total)]
    out = [f"## {_title(report)}", "", line(headers), line(align)]
    out += [line(_cells(report, r)) for r in report.rows]
    out.append(line(total))
    return "\n".join(out) + "\n"


_FORMATTERS = {"table": format_table, "csv": format_csv, "json": format_json, "markdown": format_markdown}


def format_report(report: Chargeback, fmt: str) -> str:
    """Render in ``table``, ``csv``, ``json`` or ``markdown``.

    Args:
        report: the chargeback.
        fmt: the format name.
    """
    try:
        return _FORMATTERS[fmt](report)
    except KeyError:
        raise ValueError(f"format {fmt!r} must be one of {', '.join(_FORMATTERS)}") from None


def _iso(t: float, zone: str) -> str:
    from zoneinfo import ZoneInfo

    return datetime.fromtimestamp(t, ZoneInfo(zone)).isoformat()


# -- readers ---------------------------------------------------------------------------------------------


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


def _range(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))}s"


def prometheus_queries(period: Period, now: float) -> tuple[float, dict[str, list[str]]] | None:
    """The PromQL for a month and when to evaluate it; None for a month that has not begun.

    A past month is evaluated at its end over its whole length; the current month at ``now`` over the time since its
    start. Each value's list of queries adds up: ``increase`` plus the first value of series born inside the range
    (``increase`` cannot see what a series counted before its first scrape), as the policy source does.

    Args:
        period: the month.
        now: UNIX time.

    Returns:
        ``(evaluation time, {"cost": [...], "input"/"output": [...], "requests": [...]})``.
    """
    if now <= period.start:
        return None
    at = min(now, period.end)
    rng = _range(at - period.start)
    by = ", ".join(_GROUP)
    selectors = {
        "cost": COST_USD_TOTAL,
        "input": f'{TOKENS_TOTAL}{{token_type="input"}}',
        "output": f'{TOKENS_TOTAL}{{token_type="output"}}',
        "requests": f'{REQUESTS_TOTAL}{{outcome="{_SUCCESS}"}}',
    }
    queries = {
        key: [
            f"sum by ({by}) (increase({sel}[{rng}]))",
            f"sum by ({by}) (min_over_time({sel}[{rng}]) unless {sel} offset {rng})",
        ]
        for key, sel in selectors.items()
    }
    return at, queries


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
    http = client if client is not None else httpx.Client(timeout=timeout)
    acc: dict[tuple[str, ...], dict[str, float]] = {}
    try:
        for key, qs in queries.items():
            for q in qs:
                for labels, value in _query(http, url.rstrip("/"), q, at):
                    slot = acc.setdefault(labels, {})
                    slot[key] = slot.get(key, 0.0) + value
    finally:
        if client is None:
            http.close()
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


def _query(http: httpx.Client, url: str, promql: str, at: float) -> list[tuple[tuple[str, ...], float]]:
    try:
        resp = http.get(f"{url}/api/v1/query", params={"query": promql, "time": f"{at:.3f}"})
    except httpx.HTTPError as e:
        raise ReportError(f"prometheus at {url}: {type(e).__name__}: {e or 'no answer'}") from None
    try:
        body: Any = resp.json()
    except ValueError:
        raise ReportError(f"prometheus at {url}: HTTP {resp.status_code}, body is not JSON") from None
    if resp.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
        err = body.get("error") if isinstance(body, dict) else None
        raise ReportError(f"prometheus at {url}: HTTP {resp.status_code}: {err or 'query failed'}")
    data = body.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise ReportError(f"prometheus at {url}: expected a vector result")
    out: list[tuple[tuple[str, ...], float]] = []
    for item in data["result"]:
        try:
            metric = item["metric"]
            labels = tuple(str(metric.get(name, "")) for name in _GROUP)
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise ReportError(f"prometheus at {url}: malformed sample {str(item)[:200]}") from None
        if math.isfinite(value) and value > 0:
            out.append((labels, value))
    return out


# -- the command -----------------------------------------------------------------------------------------


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
        if fmt not in _FORMATTERS:
            raise ValueError(f"--format {fmt!r} must be one of {', '.join(_FORMATTERS)}")
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
