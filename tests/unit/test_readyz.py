"""/readyz reports the policy source, and is 503 only while starting or while a fail_closed source is down."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry
from tests.conftest import fake_config

from tokenfuse.gateway.server import GatewayServer
from tokenfuse.testing.fake_upstream import FakeUpstream


async def _readyz(server: GatewayServer) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.get(server.url + "/readyz") as r:
        return r.status, await r.json()


async def test_local_source_is_ready_and_named(tmp_path: Path) -> None:
    """With the local ledger: 200, policy_source local, up, age 0."""
    async with FakeUpstream() as up:
        cfg = fake_config(up.url, tmp_path)
        async with GatewayServer(cfg, port=0, registry=CollectorRegistry()) as server:
            status, body = await _readyz(server)
    assert status == 200
    assert body == {"status": "ready", "policy_source": {"name": "local", "up": True, "last_ok_age_seconds": 0.0}}


async def test_fail_closed_source_down_is_not_ready(tmp_path: Path) -> None:
    """A Prometheus source nobody answers, fail_closed, max_staleness 1s: 503 with up false; fail_open stays 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connections are refused
        async with FakeUpstream() as up:
            for mode, expected in (("fail_closed", 503), ("fail_open", 200)):
                policy = {"source": "prometheus", "prometheus_url": dead, "interval": "0.2s", "max_staleness": "1s",
                          "on_source_error": mode, "state_path": str(tmp_path / f"{mode}.db")}  # fmt: skip
                cfg = fake_config(up.url, tmp_path, policy=policy)
                async with GatewayServer(cfg, port=0, registry=CollectorRegistry()) as server:
                    await asyncio.sleep(1.6)
                    status, body = await _readyz(server)
                assert status == expected, (mode, body)
                src = body["policy_source"]
                assert isinstance(src, dict) and src["name"] == "prometheus" and src["up"] is False
