"""Rate sources: where the policy engine learns what each department used (rolling-window tokens, month-to-date
cost). `LocalSource` reads this process's ledger (exact, immediate); `PrometheusSource` asks any Prometheus-compatible
``/api/v1/query`` endpoint for the sum over all replicas, with the client and PromQL of `tokenfuse.policies.promql`
(whose `counter_growth` says what the queries handle and what operators must: retention of at least 32 days).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from typing import Protocol, runtime_checkable

import httpx

from tokenfuse.policies.calendar import Period, month_of
from tokenfuse.policies.fuse import Reading
from tokenfuse.policies.ledger import Ledger
from tokenfuse.policies.promql import AsyncPrometheusClient, PrometheusError, month_to_date_cost, window_tokens

__all__ = ["LocalSource", "PrometheusSource", "RateSource", "Readings", "SourceError"]


class SourceError(RuntimeError):
    """The rate source did not answer usable numbers (network, HTTP status, PromQL error, malformed body)."""


@dataclass(frozen=True, slots=True)
class Readings:
    """Usage of every department the source knows, as of ``at``.

    Args:
        at: UNIX time the numbers describe (the query's evaluation time).
        period: the month ``spent_usd`` covers (``YYYY-MM``).
        tokens: tokens in the rolling window, by department.
        spent_usd: month-to-date cost, by department.
    """

    at: float
    period: str
    tokens: Mapping[str, float]
    spent_usd: Mapping[str, float]

    def reading(self, department: str) -> Reading:
        """One department's numbers (0 when the source has none: it used nothing)."""
        return Reading(
            tokens=self.tokens.get(department, 0.0),
            spent_usd=self.spent_usd.get(department, 0.0),
            period=self.period,
        )


@runtime_checkable
class RateSource(Protocol):
    """What the policy engine reads usage from."""

    @property
    def name(self) -> str:
        """The ``source`` label of ``tokenfuse_policy_source_up``."""
        ...

    async def fetch(self, now: float, departments: Sequence[str]) -> Readings:
        """Usage as of ``now``.

        Args:
            now: UNIX time.
            departments: the configured departments (a source may return more or fewer).

        Raises:
            SourceError: no usable answer.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class LocalSource:
    """This process's ledger: exact and immediate, so the engine also reads it inline on every admission.

    Args:
        ledger: the open (or to be opened) ledger.
    """

    name = "local"

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def reading(self, department: str, now: float, period: Period) -> Reading:
        """One department's usage, synchronously.

        Args:
            department: department label.
            now: UNIX time.
            period: the current month (``month_of(now, zone)``).
        """
        return Reading(
            tokens=self.ledger.window_tokens(department, now),
            spent_usd=self.ledger.month_spent(department, period),
            period=period.name,
        )

    async def fetch(self, now: float, departments: Sequence[str]) -> Readings:
        period = month_of(now, self.ledger.zone)
        tokens: dict[str, float] = {}
        spent: dict[str, float] = {}
        for d in departments:
            r = self.reading(d, now, period)
            tokens[d] = r.tokens
            spent[d] = r.spent_usd
        return Readings(at=now, period=period.name, tokens=tokens, spent_usd=spent)

    async def aclose(self) -> None:
        return None


class PrometheusSource:
    """Hourly tokens and month-to-date cost over all replicas, from PromQL.

    Args:
        url: base URL of a Prometheus-compatible API (``http://prometheus:9090``; Thanos, Mimir, VictoriaMetrics …).
        window_seconds: the rolling window of the token limit.
        zone: the budget time zone; the month-to-date range starts at the month's first instant there.
        timeout: seconds for each HTTP request (connect, read, whole).
        count_new_series: add the first value of series that appeared inside the range (see `counter_growth`).
        client: an httpx client to use (tests); by default one is made and closed by `aclose`.
    """

    name = "prometheus"

    def __init__(
        self,
        url: str,
        window_seconds: float,
        zone: tzinfo,
        *,
        timeout: float = 5.0,
        count_new_series: bool = True,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"policy.prometheus_url {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.window_seconds = float(window_seconds)
        self.zone = zone
        self.timeout = float(timeout)
        self.count_new_series = count_new_series
        self._prometheus = AsyncPrometheusClient(self.url, timeout=self.timeout, client=client)

    # -- PromQL ------------------------------------------------------------------------------------------

    def queries(self, now: float) -> dict[str, list[str]]:
        """The PromQL the source runs at ``now``: ``tokens`` and ``cost``, each a list whose results add up.

        Args:
            now: UNIX time (the month-to-date range is computed from it).
        """
        return {
            "tokens": window_tokens(self.window_seconds, count_new_series=self.count_new_series),
            "cost": month_to_date_cost(now, self.zone, count_new_series=self.count_new_series),
        }

    async def fetch(self, now: float, departments: Sequence[str]) -> Readings:
        queries = self.queries(now)
        keys = [k for k, qs in queries.items() for _ in qs]
        flat = [q for qs in queries.values() for q in qs]
        results = await asyncio.gather(*(self._query(q, now) for q in flat))
        sums: dict[str, dict[str, float]] = {"tokens": {}, "cost": {}}
        for key, vector in zip(keys, results, strict=True):
            acc = sums[key]
            for dept, value in vector.items():
                acc[dept] = acc.get(dept, 0.0) + value
        return Readings(at=now, period=month_of(now, self.zone).name, tokens=sums["tokens"], spent_usd=sums["cost"])

    async def _query(self, promql: str, now: float) -> dict[str, float]:
        try:
            samples = await self._prometheus.query(promql, now)
        except PrometheusError as e:
            raise SourceError(str(e)) from None
        out: dict[str, float] = {}
        for sample in samples:
            dept = sample.labels.get("department")
            if dept is not None:
                out[dept] = out.get(dept, 0.0) + max(sample.value, 0.0)
        return out

    async def aclose(self) -> None:
        await self._prometheus.aclose()
