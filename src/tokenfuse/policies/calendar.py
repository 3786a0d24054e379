"""The budget calendar: `Period`, a calendar month in the configured time zone, and how to find or name one.

Budgets, the ledger's month sums, month-to-date PromQL and the chargeback report all count by this month.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo

__all__ = ["Period", "month_of", "parse_period"]


@dataclass(frozen=True, slots=True)
class Period:
    """A calendar month in the configured time zone.

    Args:
        name: ``YYYY-MM``.
        start: UNIX time of the month's first instant.
        end: UNIX time of the next month's first instant.
    """

    name: str
    start: float
    end: float

    def __contains__(self, t: object) -> bool:
        return isinstance(t, int | float) and self.start <= t < self.end


def _month_start(year: int, month: int, zone: tzinfo) -> float:
    return datetime(year, month, 1, tzinfo=zone).timestamp()


def _period(year: int, month: int, zone: tzinfo) -> Period:
    ny, nm = (year + 1, 1) if month == 12 else (year, month + 1)
    return Period(f"{year:04d}-{month:02d}", _month_start(year, month, zone), _month_start(ny, nm, zone))


def month_of(now: float, zone: tzinfo) -> Period:
    """The calendar month that contains ``now`` in ``zone``.

    Args:
        now: UNIX time.
        zone: the budget time zone (``Config.zone``).
    """
    local = datetime.fromtimestamp(now, zone)
    return _period(local.year, local.month, zone)


def parse_period(name: str, zone: tzinfo) -> Period:
    """The month named ``YYYY-MM`` in ``zone``.

    Args:
        name: such as ``2026-11``.
        zone: the budget time zone.

    Raises:
        ValueError: ``name`` is not ``YYYY-MM``.
    """
    year_s, sep, month_s = name.partition("-")
    if not (sep and len(year_s) == 4 and len(month_s) == 2 and year_s.isdigit() and month_s.isdigit()):
        raise ValueError(f"period {name!r} must be YYYY-MM, e.g. 2026-11")
    year, month = int(year_s), int(month_s)
    if not (1 <= month <= 12 and year >= 1970):
        raise ValueError(f"period {name!r} must be YYYY-MM with a month 01-12, e.g. 2026-11")
    return _period(year, month, zone)
