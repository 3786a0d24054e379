"""Generated rules and Alertmanager config, end to end: fake upstream → gateway → Prometheus → Alertmanager → Slack.

Real Prometheus (1 s scrape and evaluation) and Alertmanager (1 s group_wait) run on 127.0.0.1, scraping the real
gateway (policy engine on, 1 s interval) in front of the fake upstream; an aiohttp app plays Slack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _procs import Alertmanager, Prometheus, eventually, require_binary, start_alertmanager, start_prometheus
from aiohttp import web
from prometheus_client import CollectorRegistry

from conftest import KEYS, fake_config
from tokenfuse.alerting import render_alertmanager, render_rules
from tokenfuse.config import Config, hash_key
from tokenfuse.gateway.server import GatewayServer
from tokenfuse.testing.fake_upstream import USAGE_HEADER, FakeUpstream

pytestmark = pytest.mark.integration

STARTUP_DEADLINE_S = 25.0  # Prometheus applies discovered targets and Alertmanagers only every 5 s
DELIVERY_DEADLINE_S = 20.0
SETTLE_S = 3.0  # after the expected message: three more evaluations and one more group_wait for strays
ENV = {"TOKENFUSE_TEST_UPSTREAM_KEY": "sk-upstream-openai"}
MODEL = "gpt-4o"
USD_PER_INPUT_TOKEN = 0.01  # a price override, so that one request costs exact dollars and cents

INITIAL_SPEND = {"marketing": 100.0, "engineering": 900.0, "support": 200.0}
"""Under every threshold: engineering 45% of $2000 (but over marketing's $450), support 67% (its lowest is 75%)."""


def _config(upstream_url: str, tmp_path: Path, slack_url_file: Path) -> Config:
    def keys(name: str) -> list[str]:
        return [hash_key(KEYS[name])]

    return fake_config(
        upstream_url,
        tmp_path,
        departments={
            "marketing": {"monthly_budget_usd": 500, "slack_channel": "#marketing-llm", "keys": keys("marketing")},
            "engineering": {"monthly_budget_usd": 2000, "keys": keys("engineering")},
            "support": {"monthly_budget_usd": 300, "alert_thresholds": [0.75, 0.9, 1.0], "keys": keys("support")},
        },
        pricing={"overrides": {MODEL: {"input": USD_PER_INPUT_TOKEN * 1e6, "output": 0}}},
        alerting={
            "slack": {"api_url_file": str(slack_url_file), "channel": "#llm-costs"},
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
    )


@dataclass
class SlackStandIn:
    """Records every JSON body Alertmanager posts to the Slack webhook URL."""

    payloads: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.payloads.append(json.loads(await request.read()))
        return web.Response(text="ok")


@pytest.fixture
async def slack() -> AsyncIterator[tuple[SlackStandIn, str]]:
    stand_in = SlackStandIn()
    app = web.Application()
    app.router.add_post("/slack", stand_in.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield stand_in, f"http://127.0.0.1:{runner.addresses[0][1]}/slack"
    finally:
        await runner.cleanup()


async def spend(http: aiohttp.ClientSession, gateway_url: str, department: str, usd: float) -> None:
    """The traffic: one chat completion through the gateway, whose upstream reports usage costing ``usd``.

    Args:
        http: client session.
        gateway_url: the gateway's base URL.
        department: whose virtual key to use.
        usd: what the call costs at the test's price override.
    """
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {
        "Authorization": f"Bearer {KEYS[department]}",
        USAGE_HEADER: json.dumps({"input_tokens": round(usd / USD_PER_INPUT_TOKEN), "output_tokens": 1}),
    }
    async with http.post(f"{gateway_url}/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status == 200, await response.text()


def _text(payload: dict[str, Any]) -> str:
    attachments = payload.get("attachments") or [{}]
    return " ".join(str(attachments[0].get(k, "")) for k in ("title", "text"))


async def _start(tmp_path: Path, config: Config, gateway_url: str) -> tuple[Alertmanager, Prometheus]:
    rules = tmp_path / "tokenfuse-rules.yml"
    rules.write_text(render_rules(config), encoding="utf-8")
    am = await asyncio.to_thread(start_alertmanager, tmp_path, render_alertmanager(config))
    try:
        prom = await asyncio.to_thread(start_prometheus, tmp_path, [gateway_url], [rules], alertmanager_url=am.url)
    except BaseException:
        am.stop()
        raise
    return am, prom


async def _eventually(check: Any, within_s: float, what: str) -> Any:
    # In a thread: the gateway and the Slack stand-in must keep serving from this loop while we poll.
    return await asyncio.to_thread(eventually, check, within_s, 0.2, what)


async def test_department_past_90_percent_reaches_its_slack_channel_and_no_one_else(
    tmp_path: Path, slack: tuple[SlackStandIn, str]
) -> None:
    """Marketing crossing 90% of its budget posts one Slack message to #marketing-llm naming it and 90%, nothing else."""
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    stand_in, slack_url = slack
    url_file = tmp_path / "slack_webhook_url"
    url_file.write_text(slack_url, encoding="utf-8")

    async with (
        FakeUpstream() as upstream,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        config = _config(upstream.url, tmp_path, url_file)
        async with GatewayServer(config, port=0, registry=CollectorRegistry(), environ=ENV) as gateway:
            for department, usd in INITIAL_SPEND.items():
                await spend(http, gateway.url, department, usd)
            am, prom = await _start(tmp_path, config, gateway.url)
            with am, prom:
                # Every department's spend is in Prometheus, and alerts can reach Alertmanager, before anyone
                # overspends: a rule that mixed departments up would fire now.
                await _eventually(
                    lambda: (
                        len(prom.query("department:tokenfuse_budget_spent_usd:max > 0")) == 3
                        and prom.alertmanagers_ready()
                    ),
                    STARTUP_DEADLINE_S,
                    "Prometheus to record all three departments' spend and discover Alertmanager",
                )
                await spend(http, gateway.url, "marketing", 360.12)
                await _eventually(lambda: stand_in.payloads, DELIVERY_DEADLINE_S, "a Slack message")
                await asyncio.sleep(SETTLE_S)
                firing = await asyncio.to_thread(prom.query, 'ALERTS{alertstate="firing"}')
                payloads = list(stand_in.payloads)

    assert {(a["metric"]["department"], a["metric"].get("threshold")) for a in firing} == {
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
    config = _config("http://127.0.0.1:9", tmp_path, tmp_path / "unused_url")

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

    expected = {
        ("marketing", "50"): True,
        ("marketing", "75"): True,
        ("marketing", "90"): False,
        ("engineering", "50"): False,  # another department's 90% does not silence it
        ("support", "75"): True,  # under its 100%, and under its open fuse
        ("support", "100"): False,  # the critical 100% message stays: it carries the figures
        ("support", "TokenfuseFuseOpen"): False,
        ("support", "TokenfuseHourlyTokenLimit"): True,
    }
    seen: list[dict[tuple[str, str], bool]] = []

    def inhibited() -> bool:
        got = am.alerts()
        if len(got) < len(alerts):
            return False
        seen.append(
            {
                (a["labels"]["department"], a["labels"].get("threshold", a["labels"]["alertname"])): bool(
                    a["status"]["inhibitedBy"]
                )
                for a in got
            }
        )
        # Alertmanager marks inhibitions after it has received the alerts, not with them: wait for them to settle.
        return seen[-1] == expected

    am = await asyncio.to_thread(start_alertmanager, tmp_path, render_alertmanager(config))
    with am:
        await asyncio.to_thread(am.post_alerts, alerts)
        with contextlib.suppress(AssertionError):  # on a timeout, the comparison below shows what it settled on
            await _eventually(inhibited, DELIVERY_DEADLINE_S, "Alertmanager's inhibitions to settle")

    assert seen and seen[-1] == expected
