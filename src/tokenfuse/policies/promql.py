"""The Prometheus HTTP API instant query (``/api/v1/query``) and the PromQL tokenfuse asks it.

`PrometheusClient` (sync, the report) and `AsyncPrometheusClient` (the policy source) return a vector's samples; the
builders spell every query from the metric contract, so the policy engine and the chargeback report ask alike.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from tokenfuse.exporter.metrics import COST_USD_TOTAL, REQUESTS_TOTAL, TOKENS_TOTAL
from tokenfuse.policies.calendar import Period, month_of

__all__ = [
    "CHARGEBACK_LABELS",
    "AsyncPrometheusClient",
    "PrometheusClient",
    "PrometheusError",
    "Sample",
    "counter_growth",
    "duration",
    "month_to_date_cost",
    "month_usage",
    "selector",
    "window_tokens",
]

CHARGEBACK_LABELS = ("department", "project", "provider", "model")
"""The labels the report's queries sum by: every breakdown is an aggregation of these label sets."""


class PrometheusError(RuntimeError):
    """Prometheus gave no usable answer: unreachable, too slow, an HTTP or PromQL error, or not a vector.

    Args:
        where: the server's base URL, without credentials.
        reason: what went wrong.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"prometheus at {where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Sample:
    """One element of an instant vector.

    Args:
        labels: the series' labels (``__name__`` is absent after an aggregation).
        value: the sample value, always finite.
    """

    labels: Mapping[str, str]
    value: float


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _params(promql: str, at: float) -> dict[str, str]:
    return {"query": promql, "time": f"{at:.3f}"}


def _failure(where: str, e: Exception) -> PrometheusError:
    return PrometheusError(where, f"{type(e).__name__}: {str(e) or 'no answer'}")


def _samples(resp: httpx.Response, where: str) -> list[Sample]:
    try:
        body: Any = resp.json()
    except ValueError:
        raise PrometheusError(where, f"HTTP {resp.status_code}, body is not JSON") from None
    if resp.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
        err = body.get("error") if isinstance(body, dict) else None
        raise PrometheusError(where, f"HTTP {resp.status_code}: {err or 'query failed'}")
    data = body.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise PrometheusError(where, "expected a vector result")
    out: list[Sample] = []
    for item in data["result"]:
        try:
            metric = item["metric"]
            if not isinstance(metric, dict):
                raise TypeError(metric)
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise PrometheusError(where, f"malformed sample {str(item)[:200]}") from None
        # NaN (0/0 in a rate) and ±Inf say nothing about usage; both callers would drop them anyway.
        if math.isfinite(value):
            out.append(Sample({k: v for k, v in metric.items() if isinstance(v, str)}, value))
    return out


class PrometheusClient:
    """Instant queries against a Prometheus-compatible API, synchronously (the chargeback report).

    Args:
        url: base URL (``http://prometheus:9090``; Thanos, Mimir, VictoriaMetrics …).
        timeout: seconds for each phase of a request (connect, read, write, pool).
        client: an httpx client to use (tests); by default one is made and closed by `close`.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, client: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.where = _redact(self.url)
        self._own_client = client is None
        self._client = httpx.Client(timeout=timeout) if client is None else client

    def query(self, promql: str, at: float) -> list[Sample]:
        """The instant vector of ``promql`` evaluated at ``at``.

        Args:
            promql: the expression; it must evaluate to a vector.
            at: UNIX time of the evaluation.

        Raises:
            PrometheusError: no usable answer.
        """
        try:
            resp = self._client.get(f"{self.url}/api/v1/query", params=_params(promql, at))
        except httpx.HTTPError as e:
            raise _failure(self.where, e) from None
        return _samples(resp, self.where)

    def close(self) -> None:
        """Close the connections, unless the httpx client was passed in."""
        if self._own_client:
            self._client.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncPrometheusClient:
    """Instant queries against a Prometheus-compatible API from the event loop (the policy engine's rate source).

    Args:
        url: base URL (``http://prometheus:9090``; Thanos, Mimir, VictoriaMetrics …).
        timeout: seconds for each query as a whole, and at most 2 of them to connect.
        client: an httpx client to use (tests); by default one is made on first use and closed by `aclose`.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, client: httpx.AsyncClient | None = None) -> None:
        self.url = url.rstrip("/")
        self.where = _redact(self.url)
        self.timeout = float(timeout)
        self._client = client
        self._own_client = client is None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 2.0)),
                limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
            )
        return self._client

    async def query(self, promql: str, at: float) -> list[Sample]:
        """The instant vector of ``promql`` evaluated at ``at``.

        Args:
            promql: the expression; it must evaluate to a vector.
            at: UNIX time of the evaluation.

        Raises:
            PrometheusError: no usable answer within ``timeout``.
        """
        try:
            # wait_for bounds the whole exchange: httpx's timeouts are per phase and a trickling body could outlast them.
            resp = await asyncio.wait_for(
                self._http().get(f"{self.url}/api/v1/query", params=_params(promql, at)), timeout=self.timeout
            )
        except (httpx.HTTPError, TimeoutError) as e:
            raise _failure(self.where, e) from None
        return _samples(resp, self.where)

    async def aclose(self) -> None:
        """Close the connections, unless the httpx client was passed in."""
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None


# -- PromQL builders (pure) ------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """A PromQL range in whole seconds: rounded up so no sample is missed, and at least ``1s`` (a range must be > 0).

    Args:
        seconds: the length of the range.
    """
    return f"{max(1, math.ceil(seconds))}s"


def selector(metric: str, **matchers: str) -> str:
    """A series selector with equality matchers: ``selector(TOKENS_TOTAL, token_type="input")``.

    Args:
        metric: a name from `tokenfuse.exporter.metrics`.
        **matchers: label name to the value it must equal.
    """
    if not matchers:
        return metric
    inner = ", ".join(f"{k}={_quote(v)}" for k, v in matchers.items())
    return f"{metric}{{{inner}}}"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def counter_growth(series: str, seconds: float, by: Sequence[str], *, count_new_series: bool = True) -> list[str]:
    """The PromQL terms whose results add up to how much a counter grew in the last ``seconds``, summed by ``by``.

    ``increase()`` counts across counter resets (a replica restarted under the same labels) but cannot see what a
    series counted before its first scrape (a new replica, a new label set), so a second term adds ``min_over_time``
    of the series that appeared inside the range (their first value). ``increase()`` extrapolates to the range ends
    (at most ~1 scrape interval of rate, erring high); a month-long range needs retention of at least 32 days.

    Args:
        series: a metric name or `selector`.
        seconds: the range, ending at the evaluation time.
        by: the labels to sum by.
        count_new_series: add the first-value term.
    """
    rng = duration(seconds)
    labels = ", ".join(by)
    terms = [f"sum by ({labels}) (increase({series}[{rng}]))"]
    if count_new_series:
        terms.append(f"sum by ({labels}) (min_over_time({series}[{rng}]) unless {series} offset {rng})")
    return terms


def window_tokens(window_seconds: float, *, count_new_series: bool = True) -> list[str]:
    """Tokens per department in the rolling window ending at the evaluation time (the terms add up).

    Args:
        window_seconds: the token limit's window.
        count_new_series: see `counter_growth`.
    """
    return counter_growth(TOKENS_TOTAL, window_seconds, ("department",), count_new_series=count_new_series)


def month_to_date_cost(now: float, zone: tzinfo, *, count_new_series: bool = True) -> list[str]:
    """Cost per department since the first instant of ``now``'s calendar month in ``zone``, evaluated at ``now``.

    Args:
        now: UNIX time the queries are evaluated at.
        zone: the budget time zone.
        count_new_series: see `counter_growth`.
    """
    start = month_of(now, zone).start
    return counter_growth(COST_USD_TOTAL, now - start, ("department",), count_new_series=count_new_series)


def month_usage(period: Period, now: float) -> tuple[float, dict[str, list[str]]] | None:
    """The chargeback's PromQL for a month and when to evaluate it; None for a month that has not begun.

    A past month is evaluated at its end over its whole length; the current month at ``now`` over the time since its
    start. Every query sums by `CHARGEBACK_LABELS`, and each value's list of terms adds up (see `counter_growth`).

    Args:
        period: the month.
        now: UNIX time.

    Returns:
        ``(evaluation time, {"cost": [...], "input"/"output": [...], "requests": [...]})``; requests are the
        successful (billed) ones.
    """
    if now <= period.start:
        return None
    at = min(now, period.end)
    series = {
        "cost": COST_USD_TOTAL,
        "input": selector(TOKENS_TOTAL, token_type="input"),
        "output": selector(TOKENS_TOTAL, token_type="output"),
        "requests": selector(REQUESTS_TOTAL, outcome="success"),
    }
    return at, {key: counter_growth(sel, at - period.start, CHARGEBACK_LABELS) for key, sel in series.items()}
