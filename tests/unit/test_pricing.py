"""Pricing: the fast pricer equals genai-prices' calc_price; overrides, tiers, dates and unknown models."""

from __future__ import annotations

import logging
import warnings
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import genai_prices
import pytest
from _payloads import EXPECTED, GENAI_FLAVOR, fixture, fixture_names

from tokenfuse.config import PriceOverride
from tokenfuse.metering.extract import extract_usage
from tokenfuse.metering.pricing import Price, Pricer
from tokenfuse.metering.stream import StreamUsageParser
from tokenfuse.metering.types import Usage

NOON = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _genai(provider: str, model: str, usage: Usage, when: datetime = NOON) -> genai_prices.types.PriceCalculation:
    return genai_prices.calc_price(
        genai_prices.Usage(**usage.counts()), model, provider_id=provider, genai_request_timestamp=when
    )


def _assert_equal(p: Price | None, calc: genai_prices.types.PriceCalculation) -> None:
    assert p is not None
    assert p.exact == calc.total_price
    assert p.total_usd == float(calc.total_price)
    assert p.input_usd == float(calc.input_price)
    assert p.output_usd == float(calc.output_price)
    assert p.source == "genai-prices"


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_prices_equal_calc_price(name: str) -> None:
    """Every fixture's usage, priced as the model that answered, equals genai-prices' calc_price to the Decimal."""
    fx = fixture(name)
    if fx.stream:
        parser = StreamUsageParser(fx.api)
        parser.feed(fx.sse_bytes)
        usage = parser.result()
    else:
        usage = extract_usage(fx.api, fx.body_bytes)
    assert usage == EXPECTED[name]
    assert usage is not None and usage.model is not None
    provider = GENAI_FLAVOR[fx.api][0]
    _assert_equal(Pricer().price(provider, usage.model, usage, NOON), _genai(provider, usage.model, usage))


def test_fixture_price_by_hand() -> None:
    """claude-sonnet-4-5 cache write+read: 3 in x $3 + 1111 read x $0.30 + 418 write x $3.75 + 33 out x $15 per MTok."""
    usage = EXPECTED["anthropic-messages-cache-write-and-read.json"]
    p = Pricer().price("anthropic", "claude-sonnet-4-5", usage, NOON)
    assert p is not None
    assert p.exact == (3 * Decimal("3") + 1111 * Decimal("0.3") + 418 * Decimal("3.75") + 33 * Decimal(15)) / 10**6


@pytest.mark.parametrize(
    ("provider", "model", "threshold"),
    [("anthropic", "claude-sonnet-4-5", 200_000), ("google", "gemini-2.5-pro", 200_000)],
)
def test_long_context_tier_is_a_cliff(provider: str, model: str, threshold: int) -> None:
    """Past 200k total input tokens the tier rate applies to every token (input and output), as calc_price does."""
    at = Usage(threshold, 1000)
    over = Usage(threshold + 1, 1000)
    pricer = Pricer()
    p_at, p_over = pricer.price(provider, model, at, NOON), pricer.price(provider, model, over, NOON)
    _assert_equal(p_at, _genai(provider, model, at))
    _assert_equal(p_over, _genai(provider, model, over))
    assert p_at is not None and p_over is not None
    assert p_over.input_usd > 1.9 * p_at.input_usd
    assert p_over.output_usd > 1.4 * p_at.output_usd


def test_tier_counts_cached_input_toward_the_threshold() -> None:
    """The tier threshold is on all input, cache reads included (150k read + 60k new crosses 200k)."""
    usage = Usage(210_000, 10, cache_read_tokens=150_000)
    _assert_equal(
        Pricer().price("anthropic", "claude-sonnet-4-5", usage, NOON), _genai("anthropic", "claude-sonnet-4-5", usage)
    )


def test_deepseek_off_peak_hours() -> None:
    """deepseek-chat has time-of-day prices: each hour prices like calc_price, and off-peak is cheaper."""
    usage = Usage(1_000_000, 1_000_000, cache_read_tokens=200_000)
    pricer = Pricer()
    totals = set()
    for hour in range(24):
        when = datetime(2026, 11, 28, hour, 45, tzinfo=UTC)
        p = pricer.price("deepseek", "deepseek-chat", usage, when)
        _assert_equal(p, _genai("deepseek", "deepseek-chat", usage, when))
        assert p is not None
        totals.add(p.exact)
    assert len(totals) == 2


def test_price_changes_on_start_date() -> None:
    """A price with a start date applies from that UTC day on (claude-sonnet-4-6 drops its long-context tier)."""
    usage = Usage(300_000, 100)
    pricer = Pricer()
    before = datetime(2026, 3, 12, 23, 0, tzinfo=UTC)
    after = datetime(2026, 3, 13, 1, 0, tzinfo=UTC)
    p_before = pricer.price("anthropic", "claude-sonnet-4-6", usage, before)
    p_after = pricer.price("anthropic", "claude-sonnet-4-6", usage, after)
    _assert_equal(p_before, _genai("anthropic", "claude-sonnet-4-6", usage, before))
    _assert_equal(p_after, _genai("anthropic", "claude-sonnet-4-6", usage, after))
    assert p_before != p_after


def test_naive_and_offset_times_are_utc() -> None:
    """A naive time is read as UTC and an aware one converted, as genai-prices does."""
    usage = Usage(1000, 1000)
    pricer = Pricer()
    naive = pricer.price("deepseek", "deepseek-chat", usage, datetime(2026, 11, 28, 20, 0))
    aware = pricer.price(
        "deepseek", "deepseek-chat", usage, datetime(2026, 11, 29, 5, 0, tzinfo=timezone(timedelta(hours=9)))
    )
    _assert_equal(naive, _genai("deepseek", "deepseek-chat", usage, datetime(2026, 11, 28, 20, 0, tzinfo=UTC)))
    assert naive == aware


def test_request_fee_is_priced() -> None:
    """Per-request fees (perplexity sonar, $/K requests) are part of the total but neither input nor output."""
    usage = Usage(100, 200)
    p = Pricer().price("perplexity", "sonar", usage, NOON)
    _assert_equal(p, _genai("perplexity", "sonar", usage))
    assert p is not None and p.total_usd > p.input_usd + p.output_usd


def test_web_searches_are_priced() -> None:
    """Tool-call counts in the details (Anthropic web_searches) are priced like calc_price prices them."""
    usage = Usage(2010, 50, cache_write_tokens=2000, details={"cache_write_1h_tokens": 1500, "web_searches": 2})
    _assert_equal(
        Pricer().price("anthropic", "claude-sonnet-4-5", usage, NOON), _genai("anthropic", "claude-sonnet-4-5", usage)
    )


def test_units_outside_the_fast_path_use_calc_price() -> None:
    """A model priced in units the fast path does not handle (audio hours) is priced by genai-prices itself."""
    usage = Usage(1000, 2000, cache_read_tokens=100)
    p = Pricer().price("elevenlabs", "eleven_realtime_v1_max", usage, NOON)
    _assert_equal(p, _genai("elevenlabs", "eleven_realtime_v1_max", usage))


def test_dated_response_model_and_request_model_fallback() -> None:
    """Dated names genai-prices knows are priced directly; an unknown name falls back to usage.model."""
    pricer = Pricer()
    usage = Usage(1000, 100, model="gpt-4o-2024-08-06")
    _assert_equal(pricer.price("openai", "gpt-4o-2024-08-06", usage, NOON), _genai("openai", "gpt-4o", usage))
    _assert_equal(pricer.price("openai", "my-deployment-alias", usage, NOON), _genai("openai", "gpt-4o", usage))


def test_unknown_model_is_none_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """An unknown model prices as None and is logged once per (provider, model)."""
    caplog.set_level(logging.WARNING, logger="tokenfuse.metering")
    pricer = Pricer()
    for _ in range(3):
        assert pricer.price("openai", "no-such-model-xyz", Usage(10, 10)) is None
    assert pricer.price("nonexistent-provider", "gpt-4o", Usage(10, 10)) is None
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no-such-model-xyz" in m for m in messages) == 1
    assert sum("nonexistent-provider" in m for m in messages) == 1
    assert pricer.worst_case_usd("openai", "no-such-model-xyz", 1000, 1000) == 0.0


def test_override_wins() -> None:
    """An override prices the model itself, its provider-prefixed name, and the dated names of the same model."""
    pricer = Pricer(
        {"gpt-4o": PriceOverride(input=1.0, output=2.0), "deepseek-chat": PriceOverride(input=0.5, output=1)}
    )
    usage = Usage(1_000_000, 1_000_000)
    for provider, model in [("openai", "gpt-4o"), ("openai", "gpt-4o-2024-08-06"), ("openrouter", "openai/gpt-4o")]:
        p = pricer.price(provider, model, usage)
        assert p == Price(1.0, 2.0, 3.0, Decimal(3), "override"), model
    p = pricer.price("openrouter", "deepseek/deepseek-chat", usage)
    assert p is not None and p.source == "override" and p.exact == Decimal("1.5")
    other = pricer.price("openai", "gpt-4o-mini", usage, NOON)
    assert other is not None and other.source == "genai-prices"


def test_override_also_applies_through_usage_model() -> None:
    """If the priced name has no override but the model that answered does, the override applies."""
    pricer = Pricer({"my-finetune": PriceOverride(input=4.0, output=8.0)})
    p = pricer.price("openai", "alias", Usage(500_000, 0, model="my-finetune"))
    assert p is not None and p.exact == Decimal(2)


def test_override_cache_rates() -> None:
    """Override cache reads and writes use their own rates, or the input rate when not set."""
    usage = Usage(1_000_000, 0, cache_read_tokens=400_000, cache_write_tokens=100_000)
    with_rates = Pricer({"m": PriceOverride(input=2.0, output=0, cache_read=0.5, cache_write=2.5)}).price(
        "x", "m", usage
    )
    assert with_rates is not None
    assert with_rates.exact == (500_000 * Decimal(2) + 400_000 * Decimal("0.5") + 100_000 * Decimal("2.5")) / 10**6
    defaults = Pricer({"m": PriceOverride(input=2.0, output=0)}).price("x", "m", usage)
    assert defaults is not None and defaults.exact == Decimal(2)


def test_worst_case_usd() -> None:
    """worst_case_usd is the price of that many input and output tokens, tiers included."""
    pricer = Pricer()
    expected = _genai("anthropic", "claude-sonnet-4-5", Usage(250_000, 4096), datetime.now(UTC))
    assert pricer.worst_case_usd("anthropic", "claude-sonnet-4-5", 250_000, 4096) == float(expected.total_price)


def test_inconsistent_usage_is_clamped_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """Usage with more cached than total input (which calc_price refuses) is priced with the excess clamped."""
    caplog.set_level(logging.WARNING, logger="tokenfuse.metering")
    usage = Usage(100, 10, cache_read_tokens=500)
    p = Pricer().price("openai", "gpt-4o", usage, NOON)
    assert p is not None
    assert p.exact == (500 * Decimal("1.25") + 10 * Decimal(10)) / 10**6
    with pytest.raises(ValueError):
        _genai("openai", "gpt-4o", usage)
    assert any("clamped" in r.getMessage() for r in caplog.records)


def test_estimated_and_empty_usage() -> None:
    """Zero usage costs exactly zero; estimated usage prices like reported usage."""
    pricer = Pricer()
    zero = pricer.price("openai", "gpt-4o", Usage(), NOON)
    assert zero is not None and zero.exact == 0 and zero.total_usd == 0.0
    est = pricer.price("openai", "gpt-4o", Usage(10, 10, estimated=True), NOON)
    _assert_equal(est, _genai("openai", "gpt-4o", Usage(10, 10)))


def test_slow_path_passes_only_usage_keys_genai_prices_takes() -> None:
    """Keys genai-prices does not take as usage (requests, unknown ones) are left out of its calc, without warnings."""
    usage = Usage(1000, 10, details={"requests": 3, "bogus": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = Pricer().price("elevenlabs", "eleven_realtime_v1_max", usage, NOON)
    _assert_equal(p, _genai("elevenlabs", "eleven_realtime_v1_max", Usage(1000, 10)))


@pytest.mark.parametrize(
    ("provider", "model"),
    [("openai", "gpt-4o"), ("openai", "gpt-4.1-mini"), ("anthropic", "claude-sonnet-4-5"), ("google", "gemini-2.5-pro"),
     ("deepseek", "deepseek-chat"), ("openai", "no-such-model")],
)  # fmt: skip
def test_worst_case_equals_full_price(provider: str, model: str) -> None:
    """Admission's cached affine worst case equals the full pricer, tiers (200k+ prompts) included."""
    pricer = Pricer()
    for inp, out in [(0, 0), (1, 1), (1200, 4096), (150_000, 8000), (250_000, 1000), (999_999, 0)]:
        p = pricer.price(provider, model, Usage(input_tokens=inp, output_tokens=out))
        expected = p.total_usd if p is not None else 0.0
        assert pricer.worst_case_usd(provider, model, inp, out) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_worst_case_uses_overrides() -> None:
    """An override's rates drive the worst case too."""
    pricer = Pricer({"deepseek-v3.2": PriceOverride(input=0.10, output=0.42)})
    assert pricer.worst_case_usd("deepseek", "deepseek-v3.2", 1_000_000, 1_000_000) == pytest.approx(0.52)
