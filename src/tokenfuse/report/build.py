"""The chargeback's shape and its aggregation (pure): `UsageRow`s a reader produced become `Chargeback` lines with
shares, budgets and utilization, per department, project or model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from tokenfuse.config import Config
from tokenfuse.policies.calendar import Period

__all__ = ["Breakdown", "Chargeback", "ChargebackRow", "UsageRow", "build_chargeback"]

Breakdown = Literal["department", "project", "model"]

# The columns naming a row, per breakdown. Projects are per department (a project label is not unique across them).
_KEYS: Mapping[str, tuple[str, ...]] = {
    "department": ("department",),
    "project": ("department", "project"),
    "model": ("provider", "model"),
}


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
