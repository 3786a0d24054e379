"""Enforcement through the gateway and the instrumented client: 429s, headers, admin API, reload."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from tests.conftest import KEYS, fake_config

import tokenfuse
from tokenfuse.config import hash_key
from tokenfuse.exporter.meter import Meter
from tokenfuse.gateway.server import GatewayServer
from tokenfuse.policies import PolicyEngine
from tokenfuse.testing.fake_upstream import FakeUpstream

ADMIN = "admin-secret-token"
ENV = {"TOKENFUSE_ADMIN_TOKEN": ADMIN}
# gpt-4o: $2.50 / M input, $10 / M output. 1000 in + 1000 out = $0.0125 per call.
USAGE = json.dumps({"prompt_tokens": 1000, "completion_tokens": 1000})


def departments(**marketing: Any) -> dict[str, Any]:
    return {
        "marketing": {"keys": [hash_key(KEYS["marketing"])], **marketing},
        "support": {"keys": [hash_key(KEYS["support"])]},
    }


async def _server(tmp_path: Path, **sections: Any) -> AsyncIterator[tuple[FakeUpstream, GatewayServer]]:
    async with FakeUpstream() as upstream:
        cfg = fake_config(upstream.url, tmp_path, **sections)
        async with GatewayServer(cfg, port=0, registry=CollectorRegistry(), environ=ENV) as server:
            yield upstream, server


async def call(
    server: GatewayServer, dept: str = "marketing", max_tokens: int = 1000, **body: Any
) -> aiohttp.ClientResponse:
    payload = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **body}
    async with aiohttp.ClientSession() as s:
        r = await s.post(server.url + "/v1/chat/completions", json=payload,
                         headers={"Authorization": f"Bearer {KEYS[dept]}", "x-fake-usage": USAGE})  # fmt: skip
        await r.read()
        return r


async def test_budget_exhaustion_blocks_with_429_and_headers(tmp_path: Path) -> None:
    """Once spend reaches the budget the department gets 429 budget_exceeded with Retry-After; others pass."""
    async for upstream, server in _server(tmp_path, departments=departments(monthly_budget_usd=0.05)):
        admitted = 0
        first = await call(server)
        assert first.status == 200
        assert float(first.headers["x-tokenfuse-budget-remaining-usd"]) < 0.05
        admitted += 1
        last = first
        for _ in range(10):
            last = await call(server)
            if last.status != 200:
                break
            admitted += 1
        assert last.status == 429
        err = json.loads(await last.read())["error"]
        assert err["type"] == "budget_exceeded"
        assert err["code"] in ("department_fuse_open", "insufficient_budget")
        assert last.headers["x-should-retry"] == "false"
        assert int(last.headers["retry-after"]) >= 1
        assert last.headers["x-tokenfuse-department"] == "marketing"
        assert "x-tokenfuse-fuse-state" in last.headers
        # Worst case reserved = actual usage here, so exactly 4 calls ($0.05) fit and not one more.
        assert admitted == 4
        assert len(upstream.requests) == admitted
        assert (await call(server, "support")).status == 200
        reg = server.registry
        assert reg.get_sample_value("tokenfuse_blocked_requests_total", {"department": "marketing",
                                    "reason": err["code"].replace("department_", "")}) == 1  # fmt: skip


async def test_request_that_cannot_fit_is_blocked_while_fuse_closed(tmp_path: Path) -> None:
    """A worst case larger than what is left is refused as insufficient_budget, the fuse staying closed."""
    async for upstream, server in _server(tmp_path, departments=departments(monthly_budget_usd=0.05)):
        r = await call(server, max_tokens=100000)  # $1 worst case
        assert r.status == 429
        assert json.loads(await r.read())["error"]["code"] == "insufficient_budget"
        assert r.headers["x-tokenfuse-fuse-state"] == "closed"
        assert upstream.requests == []
        assert (await call(server, max_tokens=1000)).status == 200


async def test_token_limit_sets_remaining_header(tmp_path: Path) -> None:
    """Admitted calls carry the tokens left in the window after their reservation."""
    async for _, server in _server(tmp_path, departments=departments(hourly_token_limit=10000)):
        r = await call(server, max_tokens=1000)
        assert r.status == 200
        left = int(r.headers["x-tokenfuse-tokens-remaining-1h"])
        assert 0 < left < 10000 - 1000


async def test_admin_api(tmp_path: Path) -> None:
    """Admin routes need the token; an operator can open and close a fuse and read usage."""
    async for _, server in _server(tmp_path, departments=departments(monthly_budget_usd=100)):
        assert (await call(server)).status == 200
        async with aiohttp.ClientSession() as s:
            async with s.get(server.url + "/admin/fuses") as r:
                assert r.status == 401
            auth = {"Authorization": f"Bearer {ADMIN}"}
            async with s.get(server.url + "/admin/fuses", headers=auth) as r:
                fuses = (await r.json())["fuses"]
                assert {f["department"] for f in fuses} >= {"marketing", "support"}
            async with s.post(server.url + "/admin/fuses/marketing", headers=auth,
                              json={"action": "open", "reason": "incident 42", "ttl_seconds": 600}) as r:  # fmt: skip
                assert r.status == 200
            blocked = await call(server)
            assert blocked.status == 429
            assert json.loads(await blocked.read())["error"]["code"] == "department_fuse_open"
            async with s.post(server.url + "/admin/fuses/marketing", headers=auth, json={"action": "auto"}) as r:
                assert r.status == 200
            assert (await call(server)).status == 200
            async with s.post(server.url + "/admin/fuses/marketing", headers=auth, json={"action": "explode"}) as r:
                assert r.status == 400
            async with s.post(server.url + "/admin/fuses/nobody", headers=auth, json={"action": "open"}) as r:
                assert r.status == 404
            import datetime

            period = datetime.datetime.now(datetime.UTC).strftime("%Y-%m")
            async with s.get(server.url + f"/admin/usage?department=marketing&period={period}", headers=auth) as r:
                assert r.status == 200
                text = json.dumps(await r.json())
                assert "gpt-4o" in text
            async with s.get(server.url + "/admin/usage?period=2026-13", headers=auth) as r:
                assert r.status == 400


async def test_admin_routes_absent_without_token(tmp_path: Path) -> None:
    """With no admin token configured the admin API does not exist."""
    async with FakeUpstream() as upstream:
        cfg = fake_config(upstream.url, tmp_path)
        async with GatewayServer(cfg, port=0, registry=CollectorRegistry(), environ={}) as server, \
                aiohttp.ClientSession() as s, s.get(server.url + "/admin/fuses",
                                                    headers={"Authorization": "Bearer x"}) as r:  # fmt: skip
            assert r.status == 404


async def test_reload_changes_budget_and_refuses_bad_config(tmp_path: Path) -> None:
    """Reload applies a new budget without losing spend; an invalid file is refused and the old config stays."""
    async with FakeUpstream() as upstream:
        cfg = fake_config(upstream.url, tmp_path, departments=departments(monthly_budget_usd=0.02))
        path = tmp_path / "tokenfuse.yaml"
        import yaml

        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        async with GatewayServer(cfg, config_path=path, port=0, registry=CollectorRegistry(), environ=ENV) as server:
            assert (await call(server)).status == 200
            assert (await call(server)).status == 429
            path.write_text("departments: {marketing: {monthly_budget_usd: -1}}\n")
            async with (
                aiohttp.ClientSession() as s,
                s.post(server.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}) as r,
            ):
                assert r.status == 400
            assert (await call(server)).status == 429
            data = cfg.model_dump(mode="json")
            data["departments"]["marketing"]["monthly_budget_usd"] = 1.0
            path.write_text(yaml.safe_dump(data))
            ok, _ = server.reload()
            assert ok
            r = await call(server)
            assert r.status == 200
            # Spend survived the reload: $1 minus the one admitted call ($0.0125) minus this call's reservation
            # (1000 output tokens at $10/M = $0.01, plus a few prompt tokens).
            assert float(r.headers["x-tokenfuse-budget-remaining-usd"]) == pytest.approx(1.0 - 0.0125 - 0.01, abs=1e-4)


def test_instrumented_client_raises_budget_exceeded(tmp_path: Path) -> None:
    """With raise_on_block=True the instrumented client raises tokenfuse.BudgetExceeded before sending anything."""
    from tokenfuse.testing.fake_upstream import FakeUpstreamThread

    with FakeUpstreamThread() as upstream:
        cfg = fake_config(upstream.url, tmp_path, departments=departments(monthly_budget_usd=0.03))
        reg = CollectorRegistry()
        meter = Meter(cfg, reg)
        engine = PolicyEngine(cfg, meter)
        engine.open()
        try:
            transport = tokenfuse.MeteredTransport(meter=meter, policy=engine, department="marketing",
                                                   raise_on_block=True)  # fmt: skip
            client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="x", max_retries=0,
                                   http_client=httpx.Client(transport=transport))  # fmt: skip
            upstream.set_usage({"prompt_tokens": 1000, "completion_tokens": 1000})
            sent = 0
            with pytest.raises(tokenfuse.BudgetExceeded) as e:
                for _ in range(10):
                    client.chat.completions.create(model="gpt-4o", max_tokens=1000,
                                                   messages=[{"role": "user", "content": "hi"}])  # fmt: skip
                    sent += 1
            assert sent == 2
            assert e.value.department == "marketing"
            assert e.value.reason in ("fuse_open", "insufficient_budget")
            assert len(upstream.requests) == 2
            assert reg.get_sample_value("tokenfuse_requests_total", {"department": "marketing", "project": "none",
                "environment": "none", "provider": "openai", "model": "gpt-4o", "outcome": "blocked"}) == 1  # fmt: skip
        finally:
            engine.close()
