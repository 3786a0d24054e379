"""The instrumented transport under the google-genai SDK: Gemini calls metered exactly, streamed and not."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from google import genai
from google.genai import types
from prometheus_client import CollectorRegistry

import tokenfuse
from tokenfuse.config import parse_config
from tokenfuse.exporter.meter import Meter
from tokenfuse.testing.fake_upstream import FakeUpstream, FakeUpstreamThread


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstreamThread() as up:
        yield up


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(s.value for fam in reg.collect() for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_google_genai_through_the_transport(upstream: FakeUpstream, stream: bool) -> None:
    """genai.Client with an httpx client on MeteredTransport: provider google, the usage the upstream reported."""
    upstream.reset()
    reg = CollectorRegistry()
    meter = Meter(parse_config({}), reg)
    http = httpx.Client(transport=tokenfuse.MeteredTransport(meter=meter, department="research"))
    client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=upstream.url, api_version="v1beta",
                                                                      httpx_client=http))  # fmt: skip
    if stream:
        usage = None
        for chunk in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi there"):
            usage = chunk.usage_metadata or usage
    else:
        usage = client.models.generate_content(model="gemini-2.5-flash", contents="hi there").usage_metadata
    assert usage is not None
    assert upstream.reported_totals()["input_tokens"] == usage.prompt_token_count
    assert _value(reg, "tokenfuse_tokens_total", department="research", provider="google",
                  token_type="input") == usage.prompt_token_count  # fmt: skip
    assert _value(reg, "tokenfuse_tokens_total", provider="google", token_type="output") == usage.candidates_token_count
    assert _value(reg, "tokenfuse_estimated_requests_total") == 0
