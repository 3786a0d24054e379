"""PrometheusSource against a small aiohttp fake of /api/v1/query on 127.0.0.1: PromQL, parsing, errors, engine use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from tokenfuse.config import parse_config
from tokenfuse.exporter.meter import Meter
from tokenfuse.exporter.metrics import BREAKER_STATE, COST_USD_TOTAL, POLICY_SOURCE_UP, TOKENS_TOTAL
from tokenfuse.policies import PolicyEngine, PrometheusSource, SourceError

TOKYO = ZoneInfo("Asia/Tokyo")
# 10 s after midnight on Nov 2 in Tokyo: the month-to-date range is one day and ten seconds.
NOW = datetime(2026, 11, 2, 0, 0, 10, tzinfo=TOKYO).timestamp()


def vec(*pairs: tuple[dict[str, str], str]) -> list[dict[str, Any]]:
    return [{"metric": m, "value": [NOW, v]} for m, v in pairs]


class FakePrometheus:
    """Answers /api/v1/query from canned vectors chosen by the query's function and metric; records each query."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, str]] = []
        self.mode = "ok"
        self.vectors: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        q = request.query.get("query", "")
        self.queries.append((q, request.query.get("time", "")))
        if self.mode == "http_500":
            return web.json_response({"status": "error", "errorType": "internal", "error": "boom"}, status=500)
        if self.mode == "promql_error":
            return web.json_response({"status": "error", "errorType": "bad_data", "error": "parse error"}, status=400)
        if self.mode == "html":
            return web.Response(text="<html>proxy error</html>", content_type="text/html", status=502)
        if self.mode == "matrix":
            return web.json_response({"status": "success", "data": {"resultType": "matrix", "result": []}})
        if self.mode == "malformed":
            return web.json_response(
                {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {"department": "x"}}]}}
            )
        if self.mode == "slow":
            await asyncio.sleep(1)
        func = "min_over_time" if "min_over_time" in q else "increase"
        metric = TOKENS_TOTAL if TOKENS_TOTAL in q else COST_USD_TOTAL
        result = self.vectors.get((func, metric), [])
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/query", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def prom() -> AsyncIterator[FakePrometheus]:
    p = FakePrometheus()
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def source(prom: FakePrometheus) -> AsyncIterator[PrometheusSource]:
    s = PrometheusSource(prom.url, 3600, TOKYO, timeout=0.5)
    yield s
    await s.aclose()


def test_queries_use_the_contract_metrics_the_window_and_the_month_start_in_the_zone() -> None:
    """Tokens over the window in seconds; cost over now − month start in Tokyo (1 day 10 s), plus new-series terms."""
    s = PrometheusSource("http://127.0.0.1:9", 3600, TOKYO)
    q = s.queries(NOW)
    assert q["tokens"] == [
        f"sum by (department) (increase({TOKENS_TOTAL}[3600s]))",
        f"sum by (department) (min_over_time({TOKENS_TOTAL}[3600s]) unless {TOKENS_TOTAL} offset 3600s)",
    ]
    assert q["cost"] == [
        f"sum by (department) (increase({COST_USD_TOTAL}[86410s]))",
        f"sum by (department) (min_over_time({COST_USD_TOTAL}[86410s]) unless {COST_USD_TOTAL} offset 86410s)",
    ]


def test_month_to_date_range_is_at_least_one_second_and_rounds_up() -> None:
    """At the month's first instant the range is 1s (PromQL needs > 0); fractions round up so no sample is missed."""
    start = datetime(2026, 12, 1, tzinfo=TOKYO).timestamp()
    s = PrometheusSource("http://127.0.0.1:9", 3600, TOKYO, count_new_series=False)
    assert s.queries(start)["cost"] == [f"sum by (department) (increase({COST_USD_TOTAL}[1s]))"]
    assert s.queries(start + 2.2)["cost"] == [f"sum by (department) (increase({COST_USD_TOTAL}[3s]))"]


def test_a_url_that_is_not_http_is_refused() -> None:
    """prometheus_url must be http(s); the error names the setting."""
    with pytest.raises(ValueError, match="prometheus_url"):
        PrometheusSource("127.0.0.1:9090", 3600, TOKYO)


async def test_fetch_adds_increase_and_new_series_per_department(
    prom: FakePrometheus, source: PrometheusSource
) -> None:
    """Readings are increase() plus the first values of new series, per department; NaN and unlabelled are ignored."""
    prom.vectors = {
        ("increase", TOKENS_TOTAL): vec(({"department": "eng"}, "1500.5"), ({"department": "mkt"}, "NaN"), ({}, "7")),
        ("min_over_time", TOKENS_TOTAL): vec(({"department": "eng"}, "200")),
        ("increase", COST_USD_TOTAL): vec(({"department": "eng"}, "0.25"), ({"department": "mkt"}, "1.5")),
        ("min_over_time", COST_USD_TOTAL): vec(({"department": "mkt"}, "0.5")),
    }
    r = await source.fetch(NOW, ["eng", "mkt"])
    assert r.at == NOW and r.period == "2026-11"
    assert r.tokens == {"eng": pytest.approx(1700.5)}
    assert r.spent_usd == {"eng": pytest.approx(0.25), "mkt": pytest.approx(2.0)}
    assert len(prom.queries) == 4
    assert {t for _, t in prom.queries} == {f"{NOW:.3f}"}  # evaluated at the engine's now, not the server's


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("http_500", "HTTP 500: boom"),
        ("promql_error", "HTTP 400: parse error"),
        ("html", "not JSON"),
        ("matrix", "vector"),
        ("malformed", "malformed"),
    ],
)
async def test_bad_answers_raise_source_error(
    prom: FakePrometheus, source: PrometheusSource, mode: str, match: str
) -> None:
    """HTTP errors, PromQL errors, non-JSON bodies and unexpected shapes all become SourceError naming the cause."""
    prom.mode = mode
    with pytest.raises(SourceError, match=match):
        await source.fetch(NOW, ["eng"])


async def test_a_slow_server_times_out_as_a_source_error(prom: FakePrometheus) -> None:
    """A server slower than the timeout is a SourceError, not a hung evaluation."""
    prom.mode = "slow"
    s = PrometheusSource(prom.url, 3600, TOKYO, timeout=0.2)
    try:
        with pytest.raises(SourceError, match="prometheus at"):
            await s.fetch(NOW, ["eng"])
    finally:
        await s.aclose()


async def test_connection_refused_is_a_source_error_without_credentials(prom: FakePrometheus) -> None:
    """A closed port is a SourceError; credentials in the URL never appear in the message."""
    url = prom.url.replace("http://", "http://reader:s3cret@")
    await prom.stop()
    s = PrometheusSource(url, 3600, TOKYO, timeout=0.5)
    try:
        with pytest.raises(SourceError) as info:
            await s.fetch(NOW, ["eng"])
    finally:
        await s.aclose()
    assert "s3cret" not in str(info.value) and "127.0.0.1" in str(info.value)


async def test_engine_trips_on_prometheus_numbers_and_fails_closed_when_it_goes_away(
    prom: FakePrometheus, tmp_path: Path
) -> None:
    """The engine opens a fuse on the sum Prometheus reports, marks the source down, and after max_staleness fails
    closed."""
    cfg = parse_config(
        {
            "timezone": "Asia/Tokyo",
            "departments": {"eng": {"hourly_token_limit": 10_000}, "ops": {}},
            "policy": {
                "source": "prometheus",
                "prometheus_url": prom.url,
                "state_path": str(tmp_path / "s.db"),
                "max_staleness": 30,
                "on_source_error": "fail_closed",
            },
        }
    )
    registry = CollectorRegistry()
    clock = [NOW]
    engine = PolicyEngine(cfg, Meter(cfg, registry), clock=lambda: clock[0])
    assert isinstance(engine.source, PrometheusSource)
    engine.open()
    prom.vectors = {("increase", TOKENS_TOTAL): vec(({"department": "eng"}, "9999"))}
    await engine.evaluate()
    adm = engine.admit("eng", input_tokens=1, max_output_tokens=1, provider="openai", model="m")
    assert (adm.admitted, adm.tokens_remaining) == (False, 1)
    assert registry.get_sample_value(POLICY_SOURCE_UP, {"source": "prometheus"}) == 1.0
    prom.vectors = {("increase", TOKENS_TOTAL): vec(({"department": "eng"}, "10000"))}
    await engine.evaluate()
    assert registry.get_sample_value(BREAKER_STATE, {"department": "eng", "state": "open"}) == 1.0
    prom.vectors = {}
    prom.mode = "http_500"
    clock[0] += 40
    await engine.evaluate()
    assert registry.get_sample_value(POLICY_SOURCE_UP, {"source": "prometheus"}) == 0.0
    (st,) = engine.fuse_status("eng")
    assert (st["state"], st["source_up"]) == ("open", False)
    assert engine.admit("ops", input_tokens=1, max_output_tokens=1, provider="openai", model="m").admitted
    prom.mode = "ok"
    clock[0] += 61  # the source is back and reports 0, but open_for (300 s) has not passed: still open
    await engine.evaluate()
    assert engine.fuse_status("eng")[0]["state"] == "open"
    clock[0] += 300
    await engine.evaluate()
    assert engine.fuse_status("eng")[0]["state"] == "half_open"
    await engine.stop()
