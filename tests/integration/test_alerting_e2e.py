"""Generated rules and Alertmanager config, end to end: exporter → Prometheus → Alertmanager → a Slack stand-in.

Real Prometheus (1 s scrape and evaluation) and Alertmanager (1 s group_wait) run on 127.0.0.1; an aiohttp app
plays Slack. The exporter serves the metric contract from its own `CollectorRegistry`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _procs import (
    Alertmanager,
    Prometheus,
    eventually,
    require_binary,
    start_alertmanager,
    start_prometheus,
)
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokenfuse.alerting import render_alertmanager, render_rules
from tokenfuse.config import Config, parse_config
from tokenfuse.exporter.metrics import Metrics

pytestmark = pytest.mark.integration

STARTUP_DEADLINE_S = 25.0  # Prometheus applies discovered targets and Alertmanagers only every 5 s
DELIVERY_DEADLINE_S = 20.0
SETTLE_S = 3.0  # after the expected message: three more evaluations and one more group_wait for strays

INITIAL_SPEND = {"marketing": 100.0, "engineering": 900.0, "support": 200.0}
"""Under every threshold: engineering 45% of $2000 (but over marketing's $450), support 67% (its lowest is 75%)."""


def _config(slack_url_file: Path) -> Config:
    return parse_config(
        {
            "departments": {
                "marketing": {"monthly_budget_usd": 500, "slack_channel": "#marketing-llm"},
                "engineering": {"monthly_budget_usd": 2000},
                "support": {"monthly_budget_usd": 300, "alert_thresholds": [0.75, 0.9, 1.0]},
            },
            "alerting": {
                "slack": {"api_url_file": str(slack_url_file), "channel": "#llm-costs"},
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
        }
    )


@dataclass
class SlackStandIn:
    """Records every JSON body Alertmanager posts to the Slack webhook URL."""

    payloads: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.payloads.append(json.loads(await request.read()))
        return web.Response(text="ok")


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def slack() -> AsyncIterator[tuple[SlackStandIn, str]]:
    stand_in = SlackStandIn()
    app = web.Application()
    app.router.add_post("/slack", stand_in.handle)
    runner, url = await _serve(app)
    try:
        yield stand_in, url + "/slack"
    finally:
        await runner.cleanup()


@pytest.fixture
async def exporter() -> AsyncIterator[tuple[Metrics, str]]:
    """Serves /metrics from a fresh registry; the budget gauges are set the way the gateway's policy engine does."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    async def scrape(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner, url = await _serve(app)
    try:
        yield metrics, url
    finally:
        await runner.cleanup()


def spend(metrics: Metrics, config: Config, spent_usd: dict[str, float]) -> None:
    """The traffic: set each department's month-to-date spend and limits as a gateway replica exports them.

    Args:
        metrics: the exporter's collectors.
        config: supplies the limits.
        spent_usd: department → month-to-date USD.
    """
    for name, dept in config.departments.items():
        if dept.monthly_budget_usd is not None:
            metrics.budget_limit.labels(name, "month").set(dept.monthly_budget_usd)
        metrics.set_breaker_state(name, "closed")
        if name in spent_usd:
            metrics.budget_spent.labels(name, "month").set(spent_usd[name])


def _text(payload: dict[str, Any]) -> str:
    attachments = payload.get("attachments") or [{}]
    return " ".join(str(attachments[0].get(k, "")) for k in ("title", "text"))


async def _start(tmp_path: Path, config: Config, exporter_url: str) -> tuple[Alertmanager, Prometheus]:
    rules = tmp_path / "tokenfuse-rules.yml"
    rules.write_text(render_rules(config), encoding="utf-8")
    am = await asyncio.to_thread(start_alertmanager, tmp_path, render_alertmanager(config))
    try:
        prom = await asyncio.to_thread(start_prometheus, tmp_path, [exporter_url], [rules], alertmanager_url=am.url)
    except BaseException:
        am.stop()
        raise
    return am, prom


async def _eventually(check: Any, within_s: float, what: str) -> Any:
    # In a thread: the exporter and the Slack stand-in must keep serving from this loop while we poll.
    return await asyncio.to_thread(eventually, check, within_s, 0.2, what)


async def test_department_past_90_percent_reaches_its_slack_channel_and_no_one_else(
    tmp_path: Path, slack: tuple[SlackStandIn, str], exporter: tuple[Metrics, str]
) -> None:
    """Marketing crossing 90% of its budget posts one Slack message to #marketing-llm naming it and 90%, nothing else."""
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    stand_in, slack_url = slack
    metrics, exporter_url = exporter
    url_file = tmp_path / "slack_webhook_url"
    url_file.write_text(slack_url, encoding="utf-8")
    config = _config(url_file)
    spend(metrics, config, INITIAL_SPEND)

    am, prom = await _start(tmp_path, config, exporter_url)
    with am, prom:
        # Every department's figures are in Prometheus and alerts can reach Alertmanager before anyone overspends,
        # so a rule that mixed departments up would fire now.
        await _eventually(
            lambda: len(prom.query("department:tokenfuse_budget_used:percent")) == 3 and prom.alertmanagers_ready(),
            STARTUP_DEADLINE_S,
            "Prometheus to record all three departments and discover Alertmanager",
        )
        spend(metrics, config, {"marketing": 460.12})
        await _eventually(lambda: stand_in.payloads, DELIVERY_DEADLINE_S, "a Slack message")
        await asyncio.sleep(SETTLE_S)

        firing = await asyncio.to_thread(prom.query, 'ALERTS{alertstate="firing"}')
        payloads = list(stand_in.payloads)

    assert {(a["metric"]["department"], a["metric"]["threshold"]) for a in firing} == {
        ("marketing", "50"),
        ("marketing", "75"),
        ("marketing", "90"),
    }
    assert len(payloads) == 1, [_text(p) for p in payloads]  # 50% and 75% are inhibited by 90%
    payload = payloads[0]
    assert payload["channel"] == "#marketing-llm"
    text = _text(payload)
    assert "marketing has used 90% of its monthly LLM budget" in text
    assert "marketing has spent $460.12 of $500.00 (92%) this month." in text
    assert "threshold: 90%" in text
    assert "var-department=marketing" in text
    assert "engineering" not in text and "support" not in text


async def test_higher_threshold_and_open_fuse_silence_lower_alerts_of_the_same_department(tmp_path: Path) -> None:
    """Alertmanager inhibits 50/75% under a firing 90% and under an open fuse, for that department only."""
    require_binary("prometheus-alertmanager")
    config = _config(tmp_path / "unused_url")

    def threshold(department: str, pct: str, severity: str) -> dict[str, Any]:
        labels = {"alertname": "TokenfuseBudgetThreshold", "department": department}
        return {"labels": {**labels, "threshold": pct, "severity": severity}}

    alerts = [
        threshold("marketing", "50", "info"),
        threshold("marketing", "75", "warning"),
        threshold("marketing", "90", "warning"),
        threshold("engineering", "50", "info"),
        threshold("support", "75", "warning"),
        threshold("support", "100", "critical"),
        {"labels": {"alertname": "TokenfuseFuseOpen", "department": "support", "severity": "critical"}},
        {"labels": {"alertname": "TokenfuseHourlyTokenLimit", "department": "support", "severity": "warning"}},
    ]

    def inhibited() -> dict[tuple[str, str], bool] | None:
        got = am.alerts()
        if len(got) < len(alerts):
            return None
        return {
            (a["labels"]["department"], a["labels"].get("threshold", a["labels"]["alertname"])): bool(
                a["status"]["inhibitedBy"]
            )
            for a in got
        }

    am = await asyncio.to_thread(start_alertmanager, tmp_path, render_alertmanager(config))
    with am:
        await asyncio.to_thread(am.post_alerts, alerts)
        state = await _eventually(inhibited, DELIVERY_DEADLINE_S, "Alertmanager to hold the alerts")

    assert state == {
        ("marketing", "50"): True,
        ("marketing", "75"): True,
        ("marketing", "90"): False,
        ("engineering", "50"): False,  # another department's 90% does not silence it
        ("support", "75"): True,  # under its 100%, and under its open fuse
        ("support", "100"): False,  # the critical 100% message stays: it carries the figures
        ("support", "TokenfuseFuseOpen"): False,
        ("support", "TokenfuseHourlyTokenLimit"): True,
    }
