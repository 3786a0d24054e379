"""The gateway's other API routes, with the official SDKs against the real gateway process: Gemini's native API
(google-genai, sync and async, streamed and not), Anthropic's count_tokens, OpenAI's Responses objects."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from decimal import Decimal

import anthropic
import genai_prices
import openai
import pytest
from google import genai
from google.genai import types
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import KEYS, fake_config
from tests.integration._procs import GatewayProcess

from tokenfuse.testing.fake_upstream import FakeUpstream, FakeUpstreamThread

pytestmark = pytest.mark.integration
MODEL = "gemini-2.5-flash"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstreamThread() as up:
        yield up


@pytest.fixture(scope="module")
def gw(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("routes")
    cfg = fake_config(upstream.url, tmp).model_dump(mode="json")
    # Gemini's base URL is the API root: the gateway forwards the whole /v1beta/... path.
    cfg["upstreams"].insert(0, {"name": "fake-google", "base_url": upstream.url, "provider": "google",
                                "api_key_env": "TOKENFUSE_TEST_GOOGLE_KEY", "models": ["gemini-*"]})  # fmt: skip
    g = GatewayProcess(cfg, tmp, "routes", env={"TOKENFUSE_TEST_GOOGLE_KEY": "goog-upstream-key"}).start()
    try:
        yield g
    finally:
        g.stop()


def _metrics(gw: GatewayProcess) -> dict[tuple[str, ...], float]:
    with urllib.request.urlopen(gw.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("tokenfuse_tokens_total", "tokenfuse_cost_usd_total", "tokenfuse_requests_total") \
                    and s.labels.get("provider") == "google":  # fmt: skip
                key = (s.name, s.labels.get("token_type", s.labels.get("outcome", "")))
                out[key] = out.get(key, 0.0) + s.value
    return out


def _client(gw: GatewayProcess, key: str = KEYS["marketing"]) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=gw.url, api_version="v1beta"))


def _delta(before: dict[tuple[str, ...], float], after: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def _cost(inp: int, out: int) -> float:
    price = genai_prices.calc_price(genai_prices.Usage(input_tokens=inp, output_tokens=out), MODEL,
                                    provider_id="google").total_price  # fmt: skip
    return float(Decimal(price))


@pytest.mark.parametrize("mode", ["sync", "stream", "async", "async_stream"])
async def test_google_genai_sdk_through_the_gateway(upstream: FakeUpstream, gw: GatewayProcess, mode: str) -> None:
    """google-genai through the gateway's Gemini routes: the usage the upstream reported, exactly, and its cost
    equal to genai-prices'; the upstream got its own key as x-goog-api-key and never the virtual key."""
    upstream.reset()
    before = _metrics(gw)
    client = _client(gw)
    if mode == "sync":
        r = client.models.generate_content(model=MODEL, contents="Tell me about fuses.")
        usage = r.usage_metadata
    elif mode == "stream":
        usage = None
        for chunk in client.models.generate_content_stream(model=MODEL, contents="Tell me about fuses."):
            usage = chunk.usage_metadata or usage
    elif mode == "async":
        r = await client.aio.models.generate_content(model=MODEL, contents="Tell me about fuses.")
        usage = r.usage_metadata
    else:
        usage = None
        async for chunk in await client.aio.models.generate_content_stream(
            model=MODEL, contents="Tell me about fuses."
        ):
            usage = chunk.usage_metadata or usage
    assert usage is not None and usage.prompt_token_count and usage.candidates_token_count
    d = _delta(before, _metrics(gw))
    assert d[("tokenfuse_tokens_total", "input")] == usage.prompt_token_count
    assert d[("tokenfuse_tokens_total", "output")] == usage.candidates_token_count
    assert d[("tokenfuse_requests_total", "success")] == 1
    assert d[("tokenfuse_cost_usd_total", "")] == pytest.approx(
        _cost(usage.prompt_token_count, usage.candidates_token_count), rel=1e-9)  # fmt: skip
    (req,) = upstream.requests
    assert req.headers.get("x-goog-api-key") == "goog-upstream-key"
    assert KEYS["marketing"] not in str(req.headers) and KEYS["marketing"] not in req.path


def test_gemini_key_in_the_query_is_accepted(upstream: FakeUpstream, gw: GatewayProcess) -> None:
    """?key=<virtual key> authenticates a Gemini call (test_gateway_security checks it is never forwarded)."""
    import json

    upstream.reset()
    body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()
    req = urllib.request.Request(f"{gw.url}/v1beta/models/{MODEL}:generateContent?key={KEYS['marketing']}",
                                 data=body, headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    assert len(upstream.requests) == 1


def test_gemini_errors_are_google_shaped(gw: GatewayProcess) -> None:
    """A bad key on a Gemini route raises the SDK's own ClientError with status 401 (Google's error shape)."""
    from google.genai import errors

    client = _client(gw, key="tf-not-a-key")  # kept: a garbage-collected genai.Client closes its HTTP client
    with pytest.raises(errors.ClientError) as e:
        client.models.generate_content(model=MODEL, contents="hi")
    assert e.value.code == 401
    assert e.value.status == "UNAUTHENTICATED"


def test_anthropic_count_tokens_is_passed_through_unbilled(upstream: FakeUpstream, gw: GatewayProcess) -> None:
    """messages.count_tokens through the gateway answers the upstream's count and bills nothing."""

    def billed() -> float:
        with urllib.request.urlopen(gw.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "tokenfuse_requests_total" and s.labels["provider"] == "anthropic")  # fmt: skip

    before = billed()
    c = anthropic.Anthropic(base_url=gw.url, api_key=KEYS["marketing"])
    n = c.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hello there"}])
    assert n.input_tokens > 0
    assert billed() == before
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gw.url, api_key="tf-nope").messages.count_tokens(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}])  # fmt: skip


def test_responses_objects_are_passed_through(upstream: FakeUpstream, gw: GatewayProcess) -> None:
    """responses.retrieve, input_items.list and delete reach the upstream the department's calls went to."""
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["marketing"])
    created = c.responses.create(model="gpt-4o", input="hello")
    got = c.responses.retrieve(created.id)
    assert got.id == created.id
    items = c.responses.input_items.list(created.id)
    assert len(items.data) >= 1
    c.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(created.id)
