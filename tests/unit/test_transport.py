"""The instrumented httpx transports: official SDKs, sync and async, streamed and not, metered exactly."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from decimal import Decimal

import anthropic
import genai_prices
import httpx
import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import tokenfuse
from tokenfuse.config import hash_key, parse_config
from tokenfuse.exporter.meter import Meter
from tokenfuse.testing.fake_upstream import FakeUpstream, FakeUpstreamThread

CONFIG = parse_config(
    {
        "departments": {
            "marketing": {"keys": [hash_key("k1")]},
            "sales": {"keys": [hash_key("k2")]},
        }
    }
)


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    total = 0.0
    for fam in reg.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def genai_cost(provider: str, model: str, usage: dict[str, int]) -> Decimal:
    u = genai_prices.Usage(
        input_tokens=usage["input_tokens"],
        output_tokens=usage["output_tokens"],
        cache_read_tokens=usage.get("cache_read_tokens") or None,
        cache_write_tokens=usage.get("cache_write_tokens") or None,
    )
    return genai_prices.calc_price(u, model, provider_id=provider).total_price


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstreamThread() as up:
        yield up


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def meter(reg: CollectorRegistry) -> Meter:
    return Meter(CONFIG, reg)


def _openai(upstream: FakeUpstream, meter: Meter, **kw: str) -> openai.OpenAI:
    transport = tokenfuse.MeteredTransport(meter=meter, department="marketing", project="campaign-q2",
                                           environment="production", **kw)  # fmt: skip
    return openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-x", max_retries=0,
                         http_client=httpx.Client(transport=transport))  # fmt: skip


def test_sync_chat_exact_tokens_and_cost(upstream: FakeUpstream, meter: Meter, reg: CollectorRegistry) -> None:
    """A sync chat call is metered with the upstream's usage and genai-prices' cost, under the given labels."""
    upstream.reset()
    upstream.set_usage({"prompt_tokens": 1200, "completion_tokens": 300, "cached_tokens": 200})
    try:
        client = _openai(upstream, meter)
        r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    finally:
        upstream.set_usage(None)
    assert r.usage is not None and r.usage.prompt_tokens == 1200
    labels = {"department": "marketing", "project": "campaign-q2", "environment": "production", "provider": "openai"}
    assert value(reg, "tokenfuse_tokens_total", token_type="input", **labels) == 1200
    assert value(reg, "tokenfuse_tokens_total", token_type="output", **labels) == 300
    expected = genai_cost("openai", "gpt-4o", {"input_tokens": 1200, "output_tokens": 300, "cache_read_tokens": 200})
    assert value(reg, "tokenfuse_cost_usd_total", **labels) == pytest.approx(float(expected), rel=1e-12)
    assert value(reg, "tokenfuse_requests_total", outcome="success") == 1


def test_sync_stream_metered_when_it_ends(upstream: FakeUpstream, meter: Meter, reg: CollectorRegistry) -> None:
    """A streamed chat is metered once the app has read it, with the usage chunk's numbers."""
    upstream.reset()
    client = _openai(upstream, meter)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "count to ten"}], max_tokens=10, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    assert value(reg, "tokenfuse_requests_total") == 0
    chunks = list(stream)
    assert chunks[-1].usage is not None
    rep = upstream.requests[-1].usage
    assert rep is not None
    assert value(reg, "tokenfuse_tokens_total", token_type="input") == rep["input_tokens"]
    assert value(reg, "tokenfuse_tokens_total", token_type="output") == 10
    expected = genai_cost("openai", "gpt-4o-mini", rep)
    assert value(reg, "tokenfuse_cost_usd_total") == pytest.approx(float(expected), rel=1e-12)


def test_httpx2_client_with_sync_anthropic(upstream: FakeUpstream, meter: Meter, reg: CollectorRegistry) -> None:
    """The transport plugs into an httpx2 client (what anthropic 2.x and openai 3.x use) and meters streams too."""
    client = anthropic.Anthropic(
        base_url=upstream.url, api_key="x", max_retries=0,
        http_client=httpx2.Client(transport=tokenfuse.MeteredTransport(meter=meter, department="marketing")),
    )  # fmt: skip
    m = client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=7,
                                messages=[{"role": "user", "content": "hi"}]) as s:  # fmt: skip
        final = s.get_final_message()
    assert m.usage.output_tokens == 5 and final.usage.output_tokens == 7
    assert value(reg, "tokenfuse_tokens_total", provider="anthropic", token_type="output") == 12
    assert value(reg, "tokenfuse_tokens_total", provider="anthropic", token_type="input") == (
        m.usage.input_tokens + final.usage.input_tokens
    )
    oai = openai.OpenAI(base_url=upstream.url + "/v1", api_key="x", max_retries=0,
                        http_client=httpx2.Client(transport=tokenfuse.MeteredTransport(meter=meter)))  # fmt: skip
    oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert value(reg, "tokenfuse_tokens_total", provider="openai", token_type="output") == 3


def test_labels_context_overrides_department(upstream: FakeUpstream, meter: Meter, reg: CollectorRegistry) -> None:
    """tokenfuse.labels(...) bills the calls inside the block to another department."""
    client = _openai(upstream, meter)
    with tokenfuse.labels(department="sales", project="pipeline"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert value(reg, "tokenfuse_tokens_total", department="sales", project="pipeline", token_type="output") == 3
    assert value(reg, "tokenfuse_tokens_total", department="marketing", token_type="output") == 4


def test_unknown_department_is_unassigned(upstream: FakeUpstream, meter: Meter, reg: CollectorRegistry) -> None:
    """A department that is not in config is billed as 'unassigned', never a new label value."""
    transport = tokenfuse.MeteredTransport(meter=meter, department="ghost")
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="x", http_client=httpx.Client(transport=transport))
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert value(reg, "tokenfuse_tokens_total", department="unassigned", token_type="output") == 2
    assert value(reg, "tokenfuse_tokens_total", department="ghost") == 0


async def test_async_openai_and_anthropic(upstream: FakeUpstream, meter: Meter, reg: CollectorRegistry) -> None:
    """The async transport meters OpenAI Responses streams and Anthropic messages (stream and not)."""
    async with FakeUpstream() as up:
        oai = openai.AsyncOpenAI(
            base_url=up.url + "/v1", api_key="x", max_retries=0,
            http_client=httpx.AsyncClient(transport=tokenfuse.AsyncMeteredTransport(meter=meter, department="sales")),
        )  # fmt: skip
        s = await oai.responses.create(model="gpt-4.1", input="hello", max_output_tokens=6, stream=True)
        async for _ in s:
            pass
        # anthropic 2.x only takes httpx2 clients; the same transport class serves both packages.
        ant = anthropic.AsyncAnthropic(
            base_url=up.url, api_key="x", max_retries=0,
            http_client=httpx2.AsyncClient(transport=tokenfuse.AsyncMeteredTransport(meter=meter, department="sales")),
        )  # fmt: skip
        up.set_usage({"input_tokens": 200, "cache_read_tokens": 100, "cache_write_tokens": 60, "output_tokens": 8})
        m = await ant.messages.create(model="claude-sonnet-4-5", max_tokens=8,
                                      messages=[{"role": "user", "content": "hi"}])  # fmt: skip
        assert m.usage.cache_read_input_tokens == 100
        async with ant.messages.stream(model="claude-sonnet-4-5", max_tokens=8,
                                       messages=[{"role": "user", "content": "hi"}]) as st_:  # fmt: skip
            await st_.get_final_message()
        resp_usage = up.requests[0].usage
        assert resp_usage is not None
    assert value(reg, "tokenfuse_tokens_total", provider="openai", token_type="output") == 6
    assert value(reg, "tokenfuse_tokens_total", provider="openai", token_type="input") == resp_usage["input_tokens"]
    # Anthropic's wire input_tokens (40) excludes cache reads/writes; billable input includes them: 200 per call.
    assert value(reg, "tokenfuse_tokens_total", provider="anthropic", token_type="input") == 400
    assert value(reg, "tokenfuse_tokens_total", provider="anthropic", token_type="output") == 16
    expected = 2 * genai_cost("anthropic", "claude-sonnet-4-5", {"input_tokens": 200, "output_tokens": 8,
                                                                 "cache_read_tokens": 100, "cache_write_tokens": 60})  # fmt: skip
    assert value(reg, "tokenfuse_cost_usd_total", provider="anthropic") == pytest.approx(float(expected), rel=1e-9)


def test_stream_closed_early_is_metered(upstream: FakeUpstream, meter: Meter, reg: CollectorRegistry) -> None:
    """An app that stops reading a stream early still gets the call metered (estimated when usage never came)."""
    client = _openai(upstream, meter)
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "a long story please"}], max_tokens=200, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert value(reg, "tokenfuse_requests_total", outcome="success") == 1
    assert value(reg, "tokenfuse_tokens_total", token_type="input") > 0
    assert value(reg, "tokenfuse_estimated_requests_total") == 1


def test_upstream_error_and_connection_error_counted(meter: Meter, reg: CollectorRegistry) -> None:
    """HTTP errors and transport failures are counted with their outcome and re-raised unchanged."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/boom"):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(500, json={"error": {"message": "x"}})

    t = tokenfuse.MeteredTransport(httpx.MockTransport(handler), meter=meter, department="marketing")
    with httpx.Client(transport=t) as c:
        r = c.post("https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o"})
        assert r.status_code == 500
        with pytest.raises(httpx.ConnectError):
            c.post("https://api.openai.com/v1/chat/completions/boom", json={"model": "gpt-4o"})
    assert value(reg, "tokenfuse_requests_total", outcome="upstream_error") == 1


def test_gzip_response_is_decoded_for_metering(meter: Meter, reg: CollectorRegistry) -> None:
    """A gzip-encoded response (as real APIs send) is decoded for metering and still handed to the app intact."""
    payload = {"model": "gpt-4o", "usage": {"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26},
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}  # fmt: skip
    body = gzip.compress(json.dumps(payload).encode())

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-encoding": "gzip",
                                                            "content-type": "application/json"})  # fmt: skip

    t = tokenfuse.MeteredTransport(httpx.MockTransport(handler), meter=meter, department="marketing")
    with httpx.Client(transport=t) as c:
        r = c.post("https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o"})
    assert r.json()["usage"]["prompt_tokens"] == 21
    assert value(reg, "tokenfuse_tokens_total", token_type="input") == 21
    assert value(reg, "tokenfuse_tokens_total", token_type="output") == 5


def test_non_llm_requests_pass_through_unmetered(meter: Meter, reg: CollectorRegistry) -> None:
    """Requests that are not LLM calls (GET, unknown paths) are forwarded untouched and not counted."""
    t = tokenfuse.MeteredTransport(httpx.MockTransport(lambda r: httpx.Response(200, json={"ok": 1})), meter=meter)
    with httpx.Client(transport=t) as c:
        assert c.get("https://api.openai.com/v1/models").json() == {"ok": 1}
        assert c.post("https://example.com/upload", content=b"x").status_code == 200
    assert value(reg, "tokenfuse_requests_total") == 0


class _Halves(httpx.SyncByteStream):
    """A body delivered in two chunks, not pre-read, as a real transport delivers it."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        half = len(self.body) // 2
        yield self.body[:half]
        yield self.body[half:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10)),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                ["usage", "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "model",
                 "prompt_tokens_details", "cached_tokens", "usageMetadata", "promptTokenCount"]), c, max_size=4),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
    ),
    ctype=st.sampled_from(["application/json", "text/event-stream"]),
    path=st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/embeddings",
                          "/v1beta/models/gemini-2.5-flash:generateContent"]),
)  # fmt: skip
def test_garbage_responses_never_raise_into_the_app(body: bytes, ctype: str, path: str) -> None:
    """No response body — truncated, wrong types, garbage SSE — raises out of the transport or makes a bad counter."""
    reg = CollectorRegistry()
    meter = Meter(CONFIG, reg)
    t = tokenfuse.MeteredTransport(
        httpx.MockTransport(lambda r: httpx.Response(200, stream=_Halves(body), headers={"content-type": ctype})),
        meter=meter, department="marketing",
    )  # fmt: skip
    with httpx.Client(transport=t) as c:
        r = c.post("https://api.example.com" + path, json={"model": "gpt-4o", "messages": []})
        assert r.content == body
    for fam in reg.collect():
        for s in fam.samples:
            assert s.value == s.value and s.value >= 0, s  # no NaN, no negative
    assert value(reg, "tokenfuse_requests_total") == 1


def test_start_metrics_server_serves_the_registry(meter: Meter, reg: CollectorRegistry) -> None:
    """start_metrics_server exposes what the meter recorded on a loopback port, and can be shut down."""
    import urllib.request

    labels = meter.labels(department="marketing", provider="openai", model="gpt-4o")
    meter.record(labels, usage=tokenfuse.Usage(input_tokens=7, output_tokens=3), outcome="success")
    server, thread = tokenfuse.start_metrics_server(0, registry=reg)
    try:
        port = server.server_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'tokenfuse_tokens_total{department="marketing"' in text
        assert "} 7.0" in text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
