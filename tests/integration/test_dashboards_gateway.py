"""The dashboards against the real thing: Prometheus scraping a real gateway that serves fake-upstream traffic."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from _procs import require_binary, start_prometheus
from prometheus_client import CollectorRegistry
from test_dashboards_prometheus import CORE_PANELS, RANGE_WINDOW_S, VARIABLES, _targets, _values

from tokenfuse.config import parse_config
from tokenfuse.dashboards import expand_variables
from tokenfuse.exporter.metrics import COST_USD_TOTAL
from tokenfuse.gateway.server import GatewayServer
from tokenfuse.testing.fake_upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[2]
# The keys whose sha256 examples/tokenfuse.yaml holds.
KEYS = {"marketing": "tf-demo-marketing", "engineering": "tf-demo-engineering", "support": "tf-demo-support"}


async def _traffic(url: str, stop: asyncio.Event) -> None:
    body = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hello " * 30}]}
    async with aiohttp.ClientSession() as s:
        i = 0
        while not stop.is_set():
            dept = list(KEYS)[i % 3]
            headers = {"Authorization": f"Bearer {KEYS[dept]}", "X-Project": f"p{i % 2}", "X-Environment": "prod"}
            with contextlib.suppress(aiohttp.ClientError):
                async with s.post(url + "/v1/chat/completions", json={**body, "stream": i % 4 == 0},
                                  headers=headers) as r:  # fmt: skip
                    await r.read()
            i += 1
            await asyncio.sleep(0.05)


async def test_dashboard_queries_against_gateway_metrics(tmp_path: Path) -> None:
    """Every panel query of both dashboards runs without error on a gateway's real metrics; core panels have data."""
    require_binary("prometheus")
    data: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tokenfuse.yaml").read_text())
    async with FakeUpstream() as upstream:
        for u in data["upstreams"]:
            u["base_url"] = upstream.url + "/v1"
        data["policy"]["state_path"] = str(tmp_path / "state.db")
        config = parse_config(data)
        async with GatewayServer(config, port=0, registry=CollectorRegistry(), environ={}) as gw:
            stop = asyncio.Event()
            traffic = asyncio.create_task(_traffic(gw.url, stop))
            prom = await asyncio.to_thread(start_prometheus, tmp_path, [gw.url], scrape_interval="1s")
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

                    async def api(path: str, **params: str) -> dict[str, Any]:
                        async with http.get(prom.url + path, params=params) as r:
                            out: dict[str, Any] = await r.json(content_type=None)
                            return out

                    deadline = time.monotonic() + 30
                    while True:
                        body = await api("/api/v1/query", query=f"min(count_over_time({COST_USD_TOTAL}[1m])) >= 4")
                        if body.get("status") == "success" and body["data"]["result"]:
                            break
                        assert time.monotonic() < deadline, "Prometheus did not scrape the gateway 4 times in 30 s"
                        await asyncio.sleep(0.25)

                    async def run(t: Any) -> dict[str, Any]:
                        expr = expand_variables(t.expr, VARIABLES)
                        if t.instant:
                            return await api("/api/v1/query", query=expr)
                        end = time.time()
                        return await api("/api/v1/query_range", query=expr, start=str(end - RANGE_WINDOW_S),
                                         end=str(end), step="1")  # fmt: skip

                    failures = {}
                    results: dict[tuple[str, str], list[float]] = {}
                    for uid, t in _targets():
                        body = await run(t)
                        if body.get("status") != "success" or body.get("warnings"):
                            failures[f"{uid}: {t.panel_title}/{t.ref_id}"] = body
                        else:
                            results.setdefault((uid, t.panel_title), []).extend(_values(body))
                    assert failures == {}
                    for uid, titles in CORE_PANELS.items():
                        for title in titles:
                            values = results.get((uid, title), [])
                            assert values and max(values) > 0, f"{uid}: {title} returned no positive data"
            finally:
                stop.set()
                await traffic
                await asyncio.to_thread(prom.stop)
    assert upstream.requests, "the fake upstream saw no traffic"
