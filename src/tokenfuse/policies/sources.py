"""Rate sources: where the policy engine learns what each department used (rolling-window tokens, month-to-date
cost). `LocalSource` reads this process's ledger (exact, immediate); `PrometheusSource` asks any Prometheus-compatible
``/api/v1/query`` endpoint for the sum over all replicas.

PromQL caveats the queries handle or that operators must: ``increase()`` counts across counter resets (a replica
restarted under the same labels), but it cannot see what a series counted before its first scrape (a new replica, a
new label set), so a second query adds ``min_over_time`` of series that appeared inside the range (their first value).
``increase()`` extrapolates to the range ends (at most ~1 scrape interval of rate, erring high), and a month-to-date
range needs Prometheus retention of at least 32 days.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import httpx

from tokenfuse.exporter.metrics import COST_USD_TOTAL, TOKENS_TOTAL
from tokenfuse.policies.fuse import Period, Reading, month_of
from tokenfuse.policies.ledger import Ledger

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


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _seconds(duration: float) -> str:
    return f"{max(1, math.ceil(duration))}s"


class PrometheusSource:
    """Hourly tokens and month-to-date cost over all replicas, from PromQL.

    Args:
        url: base URL of a Prometheus-compatible API (``http://prometheus:9090``; Thanos, Mimir, VictoriaMetrics …).
        window_seconds: the rolling window of the token limit.
        zone: the budget time zone; the month-to-date range starts at the month's first instant there.
        timeout: seconds for each HTTP request (connect, read, whole).
        count_new_series: add the first value of series that appeared inside the range (see module docstring).
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
        self._client = client
        self._own_client = client is None

    # -- PromQL ------------------------------------------------------------------------------------------

    def queries(self, now: float) -> dict[str, list[str]]:
        """The PromQL the source runs at ``now``: ``tokens`` and ``cost``, each a list whose results add up.

        Args:
            now: UNIX time (the month-to-date range is computed from it).
        """
        period = month_of(now, self.zone)
        window = _seconds(self.window_seconds)
        month = _seconds(now - period.start)
        out: dict[str, list[str]] = {}
        for key, metric, rng in (("tokens", TOKENS_TOTAL, window), ("cost", COST_USD_TOTAL, month)):
            qs = [f"sum by (department) (increase({metric}[{rng}]))"]
            if self.count_new_series:
                qs.append(f"sum by (department) (min_over_time({metric}[{rng}]) unless {metric} offset {rng})")
            out[key] = qs
        return out

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

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 2.0)),
                limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
            )
        return self._client

    async def _query(self, promql: str, now: float) -> dict[str, float]:
        where = _redact(self.url)
        try:
            # wait_for bounds the whole exchange: httpx's timeouts are per phase and a trickling body could outlast them.
            resp = await asyncio.wait_for(
                self._http().get(f"{self.url}/api/v1/query", params={"query": promql, "time": f"{now:.3f}"}),
                timeout=self.timeout,
            )
        except (httpx.HTTPError, TimeoutError) as e:
            raise SourceError(f"prometheus at {where}: {type(e).__name__}: {e or 'no answer'}") from None
        try:
            body: Any = resp.json()
        except ValueError:
            raise SourceError(f"prometheus at {where}: HTTP {resp.status_code}, body is not JSON") from None
        if resp.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
            err = body.get("error") if isinstance(body, dict) else None
            raise SourceError(f"prometheus at {where}: HTTP {resp.status_code}: {err or 'query failed'}")
        return _parse_vector(body, where)

    async def aclose(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None


def _parse_vector(body: dict[str, Any], where: str) -> dict[str, float]:
    data = body.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise SourceError(f"prometheus at {where}: expected a vector result")
    out: dict[str, float] = {}
    for item in data["result"]:
        try:
            dept = item["metric"].get("department")
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise SourceError(f"prometheus at {where}: malformed sample {str(item)[:200]}") from None
        if not isinstance(dept, str) or not math.isfinite(value):
            continue
        out[dept] = out.get(dept, 0.0) + max(value, 0.0)
    return out
