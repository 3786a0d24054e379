"""Every dashboard query runs on a real Prometheus scraping tokenfuse metrics under fake traffic, and returns data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from _procs import Prometheus, require_binary, start_prometheus
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenfuse.config import UNASSIGNED, Config, load_config
from tokenfuse.dashboards import (
    DEPARTMENT_UID,
    OVERVIEW_UID,
    PanelTarget,
    build_department,
    build_overview,
    expand_variables,
    iter_targets,
)
from tokenfuse.dashboards.queries import FUSE_STATE_CODES
from tokenfuse.exporter.metrics import COST_USD_TOTAL, TOKENS_TOTAL, USAGE_LABELS, Metrics

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "examples" / "tokenfuse.yaml"
DEPARTMENT = "marketing"  # the department the per-department dashboard is evaluated for
OPEN_DEPARTMENT = "marketing"  # its fuse is held open by the fake traffic
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval is at a 1 s scrape interval (4 × scrape, at least)
VARIABLES = {"department": DEPARTMENT, "__rate_interval": RATE_INTERVAL, "__range": "5m"}
STARTUP_DEADLINE_S = 30.0
MIN_SAMPLES = 4
RANGE_WINDOW_S = 30
CORE_PANELS = {
    OVERVIEW_UID: ("Month-to-date spend vs budget", "Cost rate by department", "Tokens by model and token type"),
    DEPARTMENT_UID: ("Month-to-date spend vs budget", "Cost rate by project", "Tokens by model and token type"),
}
TICK_S = 0.2


class FakeTraffic:
    """Moves every collector of the contract the way a gateway serving these departments would.

    Args:
        metrics: the collectors, in the test's own registry.
        config: departments and budgets come from here.
    """

    MODELS = (("openai", "gpt-4o-mini", 0.0004), ("anthropic", "claude-sonnet-4-5", 0.003))
    PROJECTS = (("chatbot", "prod"), ("search", "staging"))

    def __init__(self, metrics: Metrics, config: Config) -> None:
        self.m = metrics
        self.config = config
        self.spent = dict.fromkeys(config.departments, 0.0)

    def tick(self) -> None:
        """One round of requests from every department (and unassigned callers)."""
        m = self.m
        for dept in (*self.config.departments, UNASSIGNED):
            for project, env in self.PROJECTS:
                for provider, model, cost in self.MODELS:
                    usage = dict(zip(USAGE_LABELS, (dept, project, env, provider, model), strict=True))
                    m.tokens.labels(**usage, token_type="input").inc(120)
                    m.tokens.labels(**usage, token_type="output").inc(40)
                    m.cost.labels(**usage).inc(cost)
                    m.requests.labels(**usage, outcome="success").inc()
                    m.gen_ai_duration.labels("chat", provider, model, model, "").observe(0.3)
                    m.gen_ai_tokens.labels("chat", provider, model, model, "input", dept).observe(120)
                    if dept in self.spent:
                        self.spent[dept] += cost
            m.overhead.labels("/v1/chat/completions").observe(0.0008)
        for name, dept_cfg in self.config.departments.items():
            if dept_cfg.monthly_budget_usd is not None:
                m.budget_limit.labels(name, "month").set(dept_cfg.monthly_budget_usd)
            if dept_cfg.hourly_token_limit is not None:
                m.token_limit.labels(name, "1h").set(dept_cfg.hourly_token_limit)
            m.budget_spent.labels(name, "month").set(self.spent[name])
            m.tokens_window.labels(name, "1h").inc(640)
            m.set_breaker_state(name, "open" if name == OPEN_DEPARTMENT else "closed")
        open_usage = (OPEN_DEPARTMENT, "chatbot", "prod", "openai", "gpt-4o-mini")
        m.requests.labels(*open_usage, "blocked").inc()
        m.blocked.labels(OPEN_DEPARTMENT, "fuse_open").inc()
        m.breaker_transitions.labels(OPEN_DEPARTMENT, "half_open", "open").inc()
        m.estimated.labels(DEPARTMENT, "openai", "gpt-4o-mini").inc()
        m.unpriced.labels("openai", "gpt-9-preview").inc()
        m.policy_source_up.labels("local").set(1)

    async def run(self) -> None:
        """Tick until cancelled."""
        while True:
            self.tick()
            await asyncio.sleep(TICK_S)


@dataclass
class Stack:
    """A Prometheus that has scraped a few rounds of fake traffic."""

    prometheus: Prometheus
    http: aiohttp.ClientSession
    config: Config
    traffic: FakeTraffic

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET a Prometheus HTTP API endpoint; returns the parsed body whatever the status."""
        async with self.http.get(f"{self.prometheus.url}{path}", params=params) as resp:
            body: dict[str, Any] = await resp.json(content_type=None)
            return body

    async def run(self, target: PanelTarget) -> dict[str, Any]:
        """Execute a panel target as Grafana would: instant query, or range query over the last seconds."""
        expr = expand_variables(target.expr, VARIABLES)
        if target.instant:
            return await self.api("/api/v1/query", query=expr)
        end = time.time()
        return await self.api(
            "/api/v1/query_range", query=expr, start=str(end - RANGE_WINDOW_S), end=str(end), step="1"
        )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    require_binary("prometheus")
    config = load_config(EXAMPLE_CONFIG)
    registry = CollectorRegistry()
    traffic = FakeTraffic(Metrics(registry), config)
    traffic.tick()

    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    ticker = asyncio.create_task(traffic.run())
    workdir = tmp_path_factory.mktemp("prometheus")
    try:
        # start/stop block; in a thread, the event loop keeps serving the scrapes meanwhile.
        prometheus = await asyncio.to_thread(start_prometheus, workdir, [f"{host}:{port}"], scrape_interval="1s")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                s = Stack(prometheus, http, config, traffic)
                await _wait_for_samples(s)
                yield s
        finally:
            await asyncio.to_thread(prometheus.stop)
    finally:
        ticker.cancel()
        await runner.cleanup()


async def _wait_for_samples(s: Stack) -> None:
    # Enough scrapes that every rate() window holds several samples of a moving counter.
    query = f"min(count_over_time({COST_USD_TOTAL}[1m])) >= {MIN_SAMPLES}"
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            body = await s.api("/api/v1/query", query=query)
            if body.get("status") == "success" and body["data"]["result"]:
                return
        except aiohttp.ClientError:
            pass  # not listening yet
        await asyncio.sleep(0.25)
    log = s.prometheus.log_tail()
    pytest.fail(f"Prometheus had not scraped {MIN_SAMPLES} rounds within {STARTUP_DEADLINE_S}s; log tail:\n{log}")


def _targets() -> list[tuple[str, PanelTarget]]:
    config = load_config(EXAMPLE_CONFIG)
    return [
        (uid, t)
        for uid, d in ((OVERVIEW_UID, build_overview(config)), (DEPARTMENT_UID, build_department(config)))
        for t in iter_targets(d)
    ]


def _values(body: dict[str, Any]) -> list[float]:
    """Every numeric value of an instant (vector) or range (matrix) result."""
    out: list[float] = []
    for series in body["data"]["result"]:
        if "value" in series:
            out.append(float(series["value"][1]))
        out.extend(float(v) for _, v in series.get("values", []))
    return out


async def test_every_panel_query_executes_without_error(stack: Stack) -> None:
    """Each target of both dashboards, variables substituted, is accepted and evaluated by Prometheus."""
    targets = _targets()
    assert len(targets) >= 25
    failures = {}
    for uid, t in targets:
        body = await stack.run(t)
        if body.get("status") != "success" or body.get("warnings"):
            failures[f"{uid}: {t.panel_title}/{t.ref_id}"] = body
    assert failures == {}


async def test_core_panels_return_positive_data(stack: Stack) -> None:
    """Spend, cost rate and token panels of both dashboards return non-empty, positive series under traffic."""
    by_title: dict[tuple[str, str], list[PanelTarget]] = {}
    for uid, t in _targets():
        by_title.setdefault((uid, t.panel_title), []).append(t)
    for uid, titles in CORE_PANELS.items():
        for title in titles:
            for t in by_title[(uid, title)]:
                values = _values(await stack.run(t))
                assert values, f"{uid}: {title} returned no data"
                assert max(values) > 0, f"{uid}: {title} returned only zeros"


async def test_every_panel_has_data_when_every_metric_moves(stack: Stack) -> None:
    """With traffic that moves every collector, no panel of either dashboard comes back empty."""
    empty = [f"{uid}: {t.panel_title}/{t.ref_id}" for uid, t in _targets() if not _values(await stack.run(t))]
    assert empty == []


async def test_department_variable_lists_departments_with_traffic(stack: Stack) -> None:
    """label_values(tokenfuse_tokens_total, department) — the $department query — yields every department seen."""
    body = await stack.api("/api/v1/label/department/values", **{"match[]": TOKENS_TOTAL})
    assert body["status"] == "success"
    assert set(body["data"]) == {*stack.config.departments, UNASSIGNED}


async def test_fuse_state_panel_encodes_each_departments_state(stack: Stack) -> None:
    """The fuse timeline's number is the open code for the open department and the closed code for the others."""
    (fuse,) = [t for uid, t in _targets() if uid == OVERVIEW_UID and t.panel_title == "Fuse state"]
    body = await stack.api("/api/v1/query", query=expand_variables(fuse.expr, VARIABLES))
    states = {s["metric"]["department"]: float(s["value"][1]) for s in body["data"]["result"]}
    expected = {
        name: float(FUSE_STATE_CODES["open" if name == OPEN_DEPARTMENT else "closed"])
        for name in stack.config.departments
    }
    assert states == expected


async def test_spend_panel_reads_the_exported_month_to_date_gauge(stack: Stack) -> None:
    """The spend bar shows, per department, what the budget_spent gauge says (never more than was spent)."""
    (spend,) = [t for uid, t in _targets() if uid == OVERVIEW_UID and t.panel_title == "Month-to-date spend vs budget"]
    body = await stack.api("/api/v1/query", query=expand_variables(spend.expr, VARIABLES))
    shown = {s["metric"]["department"]: float(s["value"][1]) for s in body["data"]["result"]}
    assert set(shown) == set(stack.config.departments)
    assert all(v > 0 for v in shown.values()), shown
    # The gauge only grows, so what Prometheus last scraped is at most what the traffic has spent by now.
    assert all(shown[name] <= stack.traffic.spent[name] + 1e-9 for name in shown), (shown, stack.traffic.spent)
