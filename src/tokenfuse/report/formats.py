"""Rendering a `Chargeback` (pure, no I/O): an aligned table for a terminal, CSV for a spreadsheet, JSON, and
GitHub-flavoured Markdown; `format_report` picks one by name.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from tokenfuse.report.build import Chargeback, ChargebackRow

__all__ = ["ReportFormat", "format_csv", "format_json", "format_markdown", "format_report", "format_table"]

ReportFormat = Literal["table", "csv", "json", "markdown"]

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
