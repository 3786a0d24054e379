"""The Meter: the metric contract's counters and histograms, bounded labels, unpriced and estimated calls."""

from __future__ import annotations

import logging

import genai_prices
import pytest
from prometheus_client import CollectorRegistry

from tokenfuse.config import parse_config
from tokenfuse.exporter.meter import CallRecord, Meter
from tokenfuse.exporter.metrics import GEN_AI_OPERATION_DURATION, GEN_AI_TOKEN_USAGE
from tokenfuse.metering.types import Usage


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


def _meter(reg: CollectorRegistry, **metering: int) -> Meter:
    cfg = parse_config(
        {
            "departments": {"marketing": {}, "legal": {"projects": ["contracts"]}},
            "metering": metering or {"max_projects": 50},
        }
    )
    return Meter(cfg, reg)


def test_record_updates_every_usage_metric(reg: CollectorRegistry) -> None:
    """One call moves tokens (input/output), cost (= genai-prices), requests and the OTel histograms."""
    meter = _meter(reg)
    labels = meter.labels(department="marketing", project="seo", environment="prod", provider="openai", model="gpt-4o")
    usage = Usage(input_tokens=1000, output_tokens=200, cache_read_tokens=100, model="gpt-4o-2024-08-06")
    rec = meter.record(labels, usage=usage, outcome="success", operation="chat", request_model="gpt-4o", duration=0.5)
    base = {"department": "marketing", "project": "seo", "environment": "prod", "provider": "openai", "model": "gpt-4o"}
    assert reg.get_sample_value("tokenfuse_tokens_total", {**base, "token_type": "input"}) == 1000
    assert reg.get_sample_value("tokenfuse_tokens_total", {**base, "token_type": "output"}) == 200
    expected = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1000, output_tokens=200, cache_read_tokens=100), "gpt-4o", provider_id="openai"
    ).total_price
    assert reg.get_sample_value("tokenfuse_cost_usd_total", base) == pytest.approx(float(expected), rel=1e-12)
    assert rec.cost_usd == pytest.approx(float(expected), rel=1e-12)
    assert reg.get_sample_value("tokenfuse_requests_total", {**base, "outcome": "success"}) == 1
    gen = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai", "gen_ai_request_model": "gpt-4o",
           "gen_ai_response_model": "gpt-4o-2024-08-06", "department": "marketing"}  # fmt: skip
    assert reg.get_sample_value(GEN_AI_TOKEN_USAGE + "_sum", {**gen, "gen_ai_token_type": "input"}) == 1000
    assert (
        reg.get_sample_value(GEN_AI_TOKEN_USAGE + "_bucket", {**gen, "gen_ai_token_type": "output", "le": "256.0"}) == 1
    )
    dur = {k: v for k, v in gen.items() if k != "department"}
    assert reg.get_sample_value(GEN_AI_OPERATION_DURATION + "_count", {**dur, "error_type": ""}) == 1


def test_unknown_model_costs_zero_is_counted_and_logged_once(
    reg: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A model without a price costs 0, counts in tokenfuse_unpriced_requests_total, and is logged once."""
    meter = _meter(reg)
    labels = meter.labels(department="marketing", provider="openai", model="my-finetune-xyz")
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            rec = meter.record(labels, usage=Usage(input_tokens=10, output_tokens=5), outcome="success")
            assert rec.cost_usd == 0 and not rec.priced
    assert reg.get_sample_value("tokenfuse_unpriced_requests_total", {"provider": "openai",
                                                                      "model": "my-finetune-xyz"}) == 3  # fmt: skip
    assert sum("my-finetune-xyz" in r.getMessage() for r in caplog.records) == 1


def test_estimated_usage_is_counted(reg: CollectorRegistry) -> None:
    """Estimated usage still counts its tokens, and the call counts in tokenfuse_estimated_requests_total."""
    meter = _meter(reg)
    labels = meter.labels(department="marketing", provider="openai", model="gpt-4o")
    meter.record(labels, usage=Usage(input_tokens=12, output_tokens=4, estimated=True), outcome="success")
    assert reg.get_sample_value("tokenfuse_estimated_requests_total", {"department": "marketing",
                                "provider": "openai", "model": "gpt-4o"}) == 1  # fmt: skip


def test_labels_are_bounded(reg: CollectorRegistry) -> None:
    """Unknown departments become 'unassigned'; bad or surplus project values become 'other'; missing ones 'none'."""
    meter = _meter(reg, max_projects=2)
    assert meter.labels(department="ghost").department == "unassigned"
    assert meter.labels(department="marketing").project == "none"
    assert meter.labels(department="marketing", project="a").project == "a"
    assert meter.labels(department="marketing", project="b").project == "b"
    assert meter.labels(department="marketing", project="c").project == "other"  # over the cap of 2
    assert meter.labels(department="marketing", project="a").project == "a"  # admitted values stay
    assert meter.labels(department="marketing", project="Bad Value!").project == "other"
    assert meter.labels(department="legal", project="contracts").project == "contracts"
    assert meter.labels(department="legal", project="lawsuits").project == "other"  # not in the allowed list
    assert meter.labels(department="marketing", environment="PROD").environment == "prod"


def test_failing_listener_does_not_break_recording(reg: CollectorRegistry) -> None:
    """A listener that raises is logged; the metrics and other listeners still see the call."""
    meter = _meter(reg)
    seen: list[CallRecord] = []

    def bad(_: CallRecord) -> None:
        raise RuntimeError("boom")

    meter.subscribe(bad)
    meter.subscribe(seen.append)
    labels = meter.labels(department="marketing", provider="openai", model="gpt-4o")
    meter.record(labels, usage=Usage(input_tokens=1), outcome="success")
    assert len(seen) == 1 and seen[0].tokens == 1
    assert reg.get_sample_value("tokenfuse_requests_total", {"department": "marketing", "project": "none",
                                "environment": "none", "provider": "openai", "model": "gpt-4o",
                                "outcome": "success"}) == 1  # fmt: skip


def test_embeddings_observe_no_output_tokens(reg: CollectorRegistry) -> None:
    """Embeddings record input token usage only: no 0-token output observation skews the histogram."""
    meter = _meter(reg)
    labels = meter.labels(department="marketing", provider="openai", model="text-embedding-3-small")
    meter.record(labels, usage=Usage(input_tokens=30), outcome="success", operation="embeddings")
    gen = {"gen_ai_operation_name": "embeddings", "gen_ai_provider_name": "openai",
           "gen_ai_request_model": "text-embedding-3-small", "gen_ai_response_model": "text-embedding-3-small",
           "department": "marketing"}  # fmt: skip
    assert reg.get_sample_value(GEN_AI_TOKEN_USAGE + "_count", {**gen, "gen_ai_token_type": "input"}) == 1
    assert reg.get_sample_value(GEN_AI_TOKEN_USAGE + "_count", {**gen, "gen_ai_token_type": "output"}) is None
