"""Metering bounds and names: label sets capped per department, token details, OTel provider names."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry
from tests.conftest import KEYS, fake_config

from tokenfuse.config import hash_key, parse_config
from tokenfuse.exporter.meter import Meter
from tokenfuse.gateway.server import GatewayServer
from tokenfuse.metering.types import Usage
from tokenfuse.testing.fake_upstream import FakeUpstream


def _sets(reg: CollectorRegistry, department: str) -> set[tuple[str, ...]]:
    return {
        (s.labels["project"], s.labels["environment"], s.labels["provider"], s.labels["model"])
        for fam in reg.collect()
        for s in fam.samples
        if s.name == "tokenfuse_requests_total" and s.labels["department"] == department
    }


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(s.value for fam in reg.collect() for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip


def test_label_sets_are_capped_per_department() -> None:
    """3,000 distinct project × environment × model combinations from one department: at most 1,000 label sets;
    the overflow is folded into project/environment 'other' and counted."""
    cfg = parse_config({"departments": {"marketing": {"keys": [hash_key("k")]}},
                        "metering": {"max_projects": 50, "max_environments": 10}})  # fmt: skip
    reg = CollectorRegistry()
    meter = Meter(cfg, reg)
    for i in range(3000):
        labels = meter.labels(department="marketing", project=f"p{i % 50}", environment=f"e{(i // 50) % 10}",
                              provider="openai", model=f"gpt-4o-{i % 7}")  # fmt: skip
        meter.record(labels, usage=Usage(1, 1), outcome="success")
    sets = _sets(reg, "marketing")
    assert 900 <= len(sets) <= 1000
    assert any(p == "other" and e == "other" for p, e, _, _ in sets)
    assert _value(reg, "tokenfuse_requests_total", department="marketing") == 3000  # nothing lost
    assert _value(reg, "tokenfuse_label_overflow_total", department="marketing") > 0


async def test_label_sets_capped_through_the_gateway(tmp_path: Path) -> None:
    """3,000 project × environment × model combinations from one virtual key through the gateway: at most 1,000
    label sets (the default cap), every request still counted, the overflow counted."""
    import asyncio

    async with FakeUpstream(record=False) as up:
        cfg = fake_config(up.url, tmp_path, metering={"max_projects": 50, "max_environments": 10})
        reg = CollectorRegistry()
        async with GatewayServer(cfg, port=0, registry=reg, enforce=False) as server, aiohttp.ClientSession() as s:

            async def call(i: int) -> int:
                headers = {"Authorization": f"Bearer {KEYS['support']}", "X-Project": f"p{i % 50}",
                           "X-Environment": f"e{(i // 50) % 10}"}  # fmt: skip
                body = {"model": f"gpt-4o-{i // 500}", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
                async with s.post(server.url + "/v1/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    return r.status

            for start in range(0, 3000, 100):
                assert set(await asyncio.gather(*(call(i) for i in range(start, start + 100)))) == {200}
    sets = _sets(reg, "support")
    assert 900 <= len(sets) <= 1000
    assert _value(reg, "tokenfuse_requests_total", department="support", outcome="success") == 3000
    assert _value(reg, "tokenfuse_label_overflow_total", department="support") > 0


def test_token_details_are_parts_not_additions() -> None:
    """Cache reads, cache writes and reasoning are exported as details of input/output, not added to them."""
    reg = CollectorRegistry()
    meter = Meter(parse_config({}), reg)
    labels = meter.labels(department="d", provider="anthropic", model="claude-sonnet-4-5")
    meter.record(labels, usage=Usage(1000, 200, cache_read_tokens=600, cache_write_tokens=100,
                                     output_reasoning_tokens=50), outcome="success")  # fmt: skip
    assert _value(reg, "tokenfuse_tokens_total", token_type="input") == 1000
    assert _value(reg, "tokenfuse_tokens_total", token_type="output") == 200
    assert _value(reg, "tokenfuse_token_details_total", detail="cache_read") == 600
    assert _value(reg, "tokenfuse_token_details_total", detail="cache_write") == 100
    assert _value(reg, "tokenfuse_token_details_total", detail="reasoning") == 50


def test_otel_provider_names_and_no_response_model_without_answer() -> None:
    """gen_ai_provider_name uses the semconv values (google → gcp.gemini), the provider label keeps genai-prices'
    id, and a call with no answer has no gen_ai_response_model."""
    reg = CollectorRegistry()
    meter = Meter(parse_config({}), reg)
    g = meter.labels(department="d", provider="google", model="gemini-2.5-flash")
    meter.record(g, usage=Usage(10, 5), outcome="success", duration=0.1)
    meter.record(g, usage=None, outcome="upstream_error", duration=0.1, error_type="upstream_timeout")
    assert _value(reg, "tokenfuse_tokens_total", provider="google") == 15
    assert _value(reg, "gen_ai_client_token_usage_count", gen_ai_provider_name="gcp.gemini") == 2
    assert _value(reg, "gen_ai_client_operation_duration_seconds_count", gen_ai_provider_name="gcp.gemini",
                  error_type="upstream_timeout", gen_ai_response_model="") == 1  # fmt: skip
    assert _value(reg, "gen_ai_client_operation_duration_seconds_count", error_type="",
                  gen_ai_response_model="gemini-2.5-flash") == 1  # fmt: skip
