"""Properties over generated input: metering never raises or produces impossible numbers, and the fast paths equal
the slow ones (body scan vs full decode, fast pricer vs genai-prices' calc_price)."""

from __future__ import annotations

import json
import math
import warnings
from datetime import UTC, datetime
from typing import Any

import genai_prices
import pytest
from _payloads import fixture, json_fixtures, sse_fixtures
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tokenfuse.metering.extract import MAX_COUNT, extract_usage, usage_from_root
from tokenfuse.metering.pricing import Pricer
from tokenfuse.metering.stream import StreamUsageParser
from tokenfuse.metering.types import Api, Usage

APIS: list[Api] = [
    "openai.chat",
    "openai.responses",
    "openai.embeddings",
    "openai.completions",
    "anthropic.messages",
    "google.generate_content",
]
USAGE_KEYS = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
    "cached_tokens",
    "reasoning_tokens",
    "audio_tokens",
    "cache_write_tokens",
    "prompt_cache_hit_tokens",
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "output_tokens_details",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cache_creation",
    "ephemeral_5m_input_tokens",
    "ephemeral_1h_input_tokens",
    "server_tool_use",
    "web_search_requests",
    "iterations",
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "toolUsePromptTokenCount",
    "promptTokensDetails",
    "cacheTokensDetails",
    "candidatesTokensDetails",
    "modality",
    "tokenCount",
]
TOP_KEYS = ["usage", "usageMetadata", "model", "modelVersion", "response", "choices", "content", "id"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["TEXT", "AUDIO", "VIDEO", "IMAGE", "DOCUMENT", "text"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(USAGE_KEYS + TOP_KEYS) | st.text(max_size=6), children, max_size=6),
    ),
    max_leaves=12,
)
usage_like = st.dictionaries(st.sampled_from(USAGE_KEYS), json_values, max_size=10)
bodies = st.dictionaries(st.sampled_from(TOP_KEYS) | st.text(max_size=5), json_values | usage_like, max_size=5)


def _check(usage: Usage | None) -> None:
    if usage is None:
        return
    counts = [
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.output_reasoning_tokens,
        *usage.details.values(),
    ]
    for c in counts:
        assert type(c) is int
        assert 0 <= c <= 64 * MAX_COUNT  # sums of a few valid counts, never negative, never NaN
    assert usage.model is None or isinstance(usage.model, str)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(api=st.sampled_from(APIS), body=bodies, indent=st.sampled_from([None, 1]))
def test_extract_never_raises_on_wrong_types(api: Api, body: dict[str, Any], indent: int | None) -> None:
    """Usage JSON of wrong types (str, float, NaN, negative, huge, lists) gives valid counts or None, scan == decode."""
    raw = json.dumps(body, indent=indent).encode()
    usage = extract_usage(api, raw)
    _check(usage)
    _check(extract_usage(api, body))
    assert usage == usage_from_root(api, json.loads(raw))


@settings(max_examples=200, deadline=None)
@given(api=st.sampled_from(APIS), raw=st.binary(max_size=400))
def test_extract_never_raises_on_random_bytes(api: Api, raw: bytes) -> None:
    """Random bytes never make extract_usage raise."""
    _check(extract_usage(api, raw))
    _check(extract_usage(api, raw.decode("latin-1")))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("name", json_fixtures())
def test_truncated_fixture_bodies(name: str, data: st.DataObject) -> None:
    """Any strict prefix of a recorded body (a cut response) gives None, never a wrong usage or an exception."""
    raw = fixture(name).body_bytes
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    assert extract_usage(fixture(name).api, raw[:cut]) is None


# --- the body scan vs a full decode --------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=2_000_000)
decoys = st.dictionaries(
    st.sampled_from(["usage", "usageMetadata", "model", "modelVersion", "x", "text"]),
    st.recursive(
        st.one_of(counts, st.text(alphabet='{}[]",:\\ausgemod', max_size=10)),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["usage", "model", "x"]), c, max_size=3),
        max_leaves=8,
    ),
    max_size=3,
)


@st.composite
def documents(draw: st.DrawFn) -> tuple[Api, dict[str, Any]]:
    api = draw(st.sampled_from(APIS))
    google = api == "google.generate_content"
    if google:
        usage: dict[str, Any] = {"promptTokenCount": draw(counts), "candidatesTokenCount": draw(counts)}
    elif api in ("openai.responses", "anthropic.messages"):
        usage = {"input_tokens": draw(counts), "output_tokens": draw(counts)}
    else:
        usage = {"prompt_tokens": draw(counts), "completion_tokens": draw(counts)}
    fields: list[tuple[str, Any]] = [
        ("usageMetadata" if google else "usage", usage),
        ("modelVersion" if google else "model", draw(st.text(alphabet='ab-."\\{}', min_size=1, max_size=12))),
    ]
    fields += [(f"k{i}", v) for i, v in enumerate(draw(st.lists(decoys, max_size=4)))]
    order = draw(st.permutations(fields))
    return api, dict(order)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents(), indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans())
def test_scan_equals_full_decode(doc: tuple[Api, dict[str, Any]], indent: int | None, ascii_only: bool) -> None:
    """Among nested decoy "usage"/"model" keys and bracket-laden strings, the scan reads what json.loads reads."""
    api, body = doc
    raw = json.dumps(body, indent=indent, ensure_ascii=ascii_only).encode()
    expected = usage_from_root(api, json.loads(raw))
    assert extract_usage(api, raw) == expected
    assert expected is not None


# --- streams -------------------------------------------------------------------------------------------------------

sse_fragments = st.sampled_from(
    [
        b"data: ",
        b"data:",
        b"event: message_delta\n",
        b"\n",
        b"\r\n",
        b"\r",
        b"\n\n",
        b"{",
        b"}",
        b"[DONE]",
        b'"usage":{',
        b'"usage": {"prompt_tokens": -5, "completion_tokens": 1e999}',
        b'"usageMetadata":{"promptTokenCount":"x"}',
        b'{"type":"message_start","message":{"usage":{"input_tokens":NaN}}}',
        b'{"type":"message_delta","usage":{"output_tokens":[1]}}',
        b'{"type":"response.completed","response":{"usage":{"input_tokens":1}}}',
        b'"content":"\\ud83d',
        b'"text":"\xf0\x9f',
        b'"delta":"x\\',
        b"\xff\xfe",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(api=st.sampled_from(APIS), parts=st.lists(sse_fragments | st.binary(max_size=30), max_size=40))
def test_stream_parser_never_raises_on_garbage(api: Api, parts: list[bytes]) -> None:
    """Garbage SSE (broken JSON, wrong types, bad escapes, split UTF-8) never raises nor yields impossible counts."""
    p = StreamUsageParser(api)
    for part in parts:
        p.feed(part)
    _check(p.result())
    assert isinstance(p.output_text, str)
    assert p.output_chars >= 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("name", sse_fixtures())
def test_truncated_fixture_streams(name: str, data: st.DataObject) -> None:
    """A fixture stream cut anywhere gives None or a valid usage no larger than the full stream's."""
    fx = fixture(name)
    raw = fx.sse_bytes
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)))
    p = StreamUsageParser(fx.api)
    p.feed(raw[:cut])
    usage = p.result()
    _check(usage)
    full = StreamUsageParser(fx.api)
    full.feed(raw)
    final = full.result()
    assert final is not None
    if usage is not None and fx.api != "anthropic.messages":
        assert usage.output_tokens <= final.output_tokens


# --- pricing -------------------------------------------------------------------------------------------------------

MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4.1"),
    ("openai", "gpt-4o-mini"),
    ("openai", "o3-mini"),
    ("openai", "gpt-5"),
    ("anthropic", "claude-sonnet-4-5"),
    ("anthropic", "claude-sonnet-4"),
    ("google", "gemini-2.5-flash"),
    ("google", "gemini-2.5-pro"),
    ("deepseek", "deepseek-chat"),
    ("openai", "text-embedding-3-small"),
]
PRICER = Pricer()


@st.composite
def consistent_usages(draw: st.DrawFn) -> dict[str, int]:
    """Counts as providers report them: every detail within its total (genai-prices refuses anything else)."""
    plain = draw(st.integers(0, 260_000))
    audio = draw(st.integers(0, 20_000))
    read = draw(st.integers(0, 120_000))
    audio_read = draw(st.integers(0, 5_000))
    w5 = draw(st.integers(0, 40_000))
    w1h = draw(st.integers(0, 40_000))
    out = draw(st.integers(0, 70_000))
    reasoning = draw(st.integers(0, out))
    return {
        "input_tokens": plain + audio + read + audio_read + w5 + w1h,
        "cache_read_tokens": read + audio_read,
        "cache_write_tokens": w5 + w1h,
        "cache_write_5m_tokens": w5,
        "cache_write_1h_tokens": w1h,
        "input_audio_tokens": audio + audio_read,
        "cache_audio_read_tokens": audio_read,
        "output_tokens": out,
        "output_reasoning_tokens": reasoning,
        "web_searches": draw(st.integers(0, 3)),
    }


def _usage(values: dict[str, int]) -> Usage:
    core = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "output_reasoning_tokens")
    return Usage(
        *(values[k] for k in core),
        details={k: v for k, v in values.items() if k not in core},
    )


times = st.datetimes(min_value=datetime(2025, 9, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC))


_NO_DETAILS = dict.fromkeys(
    [
        "cache_read_tokens",
        "cache_write_tokens",
        "cache_write_5m_tokens",
        "cache_write_1h_tokens",
        "input_audio_tokens",
        "cache_audio_read_tokens",
        "output_reasoning_tokens",
        "web_searches",
    ],
    0,
)


@settings(max_examples=400, deadline=None)
@given(model=st.sampled_from(MODELS), values=consistent_usages(), when=times)
@example(
    model=("anthropic", "claude-sonnet-4-5"),
    values=_NO_DETAILS | {"input_tokens": 200_001, "output_tokens": 10},
    when=datetime(2026, 1, 1, tzinfo=UTC),
)
@example(
    model=("google", "gemini-2.5-pro"),
    values=_NO_DETAILS | {"input_tokens": 200_000, "output_tokens": 10},
    when=datetime(2026, 1, 1, tzinfo=UTC),
)
def test_fast_price_equals_calc_price(model: tuple[str, str], values: dict[str, int], when: datetime) -> None:
    """Generated usages (caches, TTLs, audio, reasoning, searches, 200k tiers, any time) price as calc_price does."""
    provider, name = model
    usage = _usage(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = genai_prices.calc_price(
            genai_prices.Usage(**values), name, provider_id=provider, genai_request_timestamp=when
        )
    p = PRICER.price(provider, name, usage, when)
    assert p is not None
    assert p.exact == calc.total_price
    assert p.total_usd == float(calc.total_price)
    assert p.input_usd == float(calc.input_price)
    assert p.output_usd == float(calc.output_price)


@settings(max_examples=400, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    values=consistent_usages(),
    core_only=st.booleans(),
    skew=st.sampled_from([0, 0, 1, -1]),
)
def test_meter_fast_cost_equals_price(
    model: tuple[str, str], values: dict[str, int], core_only: bool, skew: int
) -> None:
    """`Pricer.cost_usd` (the meter's linear fast path) is the same float as `Pricer.price(...).total_usd`.

    ``core_only`` drops the details (the fast path's case); ``skew`` moves the cache reads one past what the input
    allows (or one below), so inconsistent usage is covered as well.
    """
    provider, name = model
    usage = _usage(values)
    if core_only:
        usage = usage._replace(details={}, cache_read_tokens=max(0, usage.cache_read_tokens + skew))
    p = PRICER.price(provider, name, usage)
    assert p is not None
    assert PRICER.cost_usd(provider, name, usage) == p.total_usd


weird_counts = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(
        [*MODELS, ("openai", "unknown-model"), ("nope", "gpt-4o"), ("elevenlabs", "eleven_realtime_v1_max")]
    ),
    core=st.lists(weird_counts, min_size=5, max_size=5),
    details=st.dictionaries(
        st.sampled_from(["cache_write_1h_tokens", "input_audio_tokens", "web_searches", "bogus", "requests"]),
        weird_counts,
        max_size=4,
    ),
    response_model=st.none() | st.sampled_from(["gpt-4o", "", "x"]),
)
def test_pricer_never_raises_or_goes_negative(
    model: tuple[str, str], core: list[Any], details: dict[str, Any], response_model: str | None
) -> None:
    """No malformed Usage (negative, huge, NaN, wrong types, unknown keys) makes the pricer raise or cost < 0 / NaN."""
    usage = Usage(*core, details=details, model=response_model)  # deliberately ill-typed
    p = PRICER.price(model[0], model[1], usage)
    if p is not None:
        for v in (p.input_usd, p.output_usd, p.total_usd):
            assert math.isfinite(v) and v >= 0
        assert p.exact.is_finite() and p.exact >= 0
    fast = PRICER.cost_usd(model[0], model[1], usage)
    assert fast == (None if p is None else p.total_usd)
    w = PRICER.worst_case_usd(model[0], model[1], core[0] if type(core[0]) is int else 0, 10**30)
    assert math.isfinite(w) and w >= 0
