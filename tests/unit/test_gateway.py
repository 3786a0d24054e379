"""The gateway against the fake upstream: official SDKs as clients, exact metering, every error path counted."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from prometheus_client import CollectorRegistry
from tests.conftest import KEYS, fake_config

from tokenfuse.exporter.metrics import REQUESTS_TOTAL, TOKENS_TOTAL
from tokenfuse.gateway.server import GatewayServer
from tokenfuse.testing.fake_upstream import FakeUpstream

ENV = {"TOKENFUSE_TEST_UPSTREAM_KEY": "sk-upstream-openai", "TOKENFUSE_TEST_ANTHROPIC_KEY": "sk-upstream-anthropic"}


class Stack:
    def __init__(self, upstream: FakeUpstream, server: GatewayServer, registry: CollectorRegistry) -> None:
        self.upstream = upstream
        self.server = server
        self.registry = registry

    @property
    def url(self) -> str:
        return self.server.url

    def tokens(self, department: str, token_type: str, **labels: str) -> float:
        total = 0.0
        for fam in self.registry.collect():
            for s in fam.samples:
                if s.name != TOKENS_TOTAL:
                    continue
                if s.labels["department"] != department or s.labels["token_type"] != token_type:
                    continue
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def requests(self, outcome: str, department: str | None = None) -> float:
        total = 0.0
        for fam in self.registry.collect():
            for s in fam.samples:
                if (
                    s.name == REQUESTS_TOTAL
                    and s.labels["outcome"] == outcome
                    and (department is None or s.labels["department"] == department)
                ):
                    total += s.value
        return total

    def cost(self, department: str) -> float:
        total = 0.0
        for fam in self.registry.collect():
            for s in fam.samples:
                if s.name == "tokenfuse_cost_usd_total" and s.labels["department"] == department:
                    total += s.value
        return total


async def _stack(tmp_path: Path, **sections: Any) -> AsyncIterator[Stack]:
    async with FakeUpstream() as upstream:
        cfg = fake_config(upstream.url, tmp_path, **sections)
        registry = CollectorRegistry()
        async with GatewayServer(cfg, port=0, registry=registry, environ=ENV, enforce=False) as server:
            yield Stack(upstream, server, registry)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async for s in _stack(tmp_path):
        yield s


def _oai(stack: Stack, dept: str = "marketing", **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=stack.url + "/v1", api_key=KEYS[dept], max_retries=0, default_headers=headers or None
    )


async def test_openai_sdk_chat_metered_exactly(stack: Stack) -> None:
    """A non-streamed chat through the gateway is metered with exactly the usage the upstream reported."""
    client = _oai(stack, **{"X-Project": "campaign-q2", "X-Environment": "production"})
    r = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello there"}], max_tokens=7
    )
    assert r.usage is not None
    rec = stack.upstream.requests[-1]
    assert rec.usage is not None
    assert (
        stack.tokens("marketing", "input", project="campaign-q2", environment="production")
        == rec.usage["input_tokens"]
        == r.usage.prompt_tokens
    )
    assert stack.tokens("marketing", "output", model="gpt-4o", provider="openai") == r.usage.completion_tokens == 7
    assert stack.cost("marketing") > 0
    assert stack.requests("success", "marketing") == 1


async def test_stream_without_usage_request_is_metered_and_client_sees_no_usage_chunk(stack: Stack) -> None:
    """The gateway asks upstream for stream usage, meters it, and hides that extra chunk from the client."""
    client = _oai(stack, "engineering")
    chunks = []
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "count"}], max_tokens=12, stream=True
    )
    async for c in stream:
        chunks.append(c)
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    sent = stack.upstream.requests[-1].body
    assert sent is not None and sent["stream_options"] == {"include_usage": True}
    reported = stack.upstream.requests[-1].usage
    assert reported is not None
    assert stack.tokens("engineering", "output") == reported["output_tokens"] == 12
    assert stack.tokens("engineering", "input") == reported["input_tokens"]


async def test_stream_with_usage_requested_keeps_the_usage_chunk(stack: Stack) -> None:
    """A client that asked for usage still gets the usage chunk, and the call is metered once."""
    client = _oai(stack)
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    async for c in stream:
        if c.usage is not None:
            usage = c.usage
    assert usage is not None and usage.completion_tokens == 5
    assert stack.tokens("marketing", "output") == 5
    assert stack.requests("success") == 1


async def test_responses_and_embeddings_routes(stack: Stack) -> None:
    """Responses (stream and not) and Embeddings are forwarded and metered."""
    client = _oai(stack, "support")
    r = await client.responses.create(model="gpt-4.1", input="say hi", max_output_tokens=9)
    assert r.usage is not None and r.usage.output_tokens == 9
    s = await client.responses.create(model="gpt-4.1", input="say hi", max_output_tokens=4, stream=True)
    async for _ in s:
        pass
    e = await client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d e"])
    assert e.usage.prompt_tokens > 0
    expected_in = sum(r.usage["input_tokens"] for r in stack.upstream.requests if r.usage)
    assert stack.tokens("support", "input") == expected_in
    assert stack.tokens("support", "output") == 13


async def test_anthropic_sdk_messages_stream_and_not(stack: Stack) -> None:
    """Anthropic clients authenticate with x-api-key; cache tokens count as input; upstream gets its own key."""
    client = anthropic.AsyncAnthropic(base_url=stack.url, api_key=KEYS["marketing"], max_retries=0)
    stack.upstream.set_usage({"input_tokens": 50, "cache_read_tokens": 30, "output_tokens": 11})
    m = await client.messages.create(
        model="claude-sonnet-4-5", max_tokens=11, messages=[{"role": "user", "content": "hi"}]
    )
    assert m.usage.output_tokens == 11
    async with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=11, messages=[{"role": "user", "content": "hi"}]
    ) as s:
        final = await s.get_final_message()
    assert final.usage.output_tokens == 11
    assert stack.tokens("marketing", "input", provider="anthropic") == 100
    assert stack.tokens("marketing", "output", provider="anthropic") == 22
    headers = stack.upstream.requests[-1].headers
    assert headers.get("x-api-key") == "sk-upstream-anthropic"
    assert KEYS["marketing"] not in json.dumps(headers)


async def test_client_key_never_goes_upstream_and_tags_are_stripped(stack: Stack) -> None:
    """The virtual key is replaced by the upstream key, and body tags are removed before forwarding."""
    async with aiohttp.ClientSession() as s:
        body = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "x"}],
            "tags": {"project": "seo", "environment": "staging"},
        }
        async with s.post(
            stack.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS['marketing']}"}
        ) as r:
            assert r.status == 200
            assert r.headers["x-tokenfuse-department"] == "marketing"
    rec = stack.upstream.requests[-1]
    assert rec.body is not None and "tags" not in rec.body
    assert rec.headers["authorization"] == "Bearer sk-upstream-openai"
    assert stack.tokens("marketing", "input", project="seo", environment="staging") > 0


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, {"model": "gpt-4o", "messages": []}, 401, "missing_api_key"),
        ({"Authorization": "Bearer tf-not-a-key"}, {"model": "gpt-4o", "messages": []}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEYS['marketing']}"}, b"{not json", 400, "invalid_json"),
        ({"Authorization": f"Bearer {KEYS['marketing']}"}, {"messages": []}, 400, "missing_model"),
        (
            {"Authorization": f"Bearer {KEYS['marketing']}"},
            {"model": "llama-9", "messages": []},
            404,
            "model_not_found",
        ),
        (
            {"Authorization": f"Bearer {KEYS['marketing']}", "X-Tokenfuse-Department": "engineering"},
            {"model": "gpt-4o", "messages": []},
            403,
            "department_mismatch",
        ),
        (
            {"Authorization": f"Bearer {KEYS['marketing']}"},
            {"model": "gpt-4o", "messages": [], "tags": {"department": "support"}},
            403,
            "department_mismatch",
        ),
    ],
)
async def test_client_errors_are_openai_style_and_not_forwarded(
    stack: Stack, headers: dict[str, str], body: Any, status: int, code: str
) -> None:
    """Each refusal has its status and an OpenAI-style error, nothing reaches upstream, and it is counted."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as s,
        s.post(stack.url + "/v1/chat/completions", data=data, headers=headers) as r,
    ):
        assert r.status == status
        err = (await r.json())["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert stack.upstream.requests == []
    assert stack.requests("client_error") == 1


async def test_body_over_limit_is_413(tmp_path: Path) -> None:
    """A body over gateway.max_body_bytes is refused with 413 before it is forwarded."""
    async for st in _stack(tmp_path, gateway={"max_body_bytes": 1000}):
        big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]}
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                st.url + "/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {KEYS['support']}"}
            ) as r,
        ):
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
        assert st.upstream.requests == []


async def test_keyless_calls_are_unassigned_when_allowed(tmp_path: Path) -> None:
    """With require_key false, keyless calls pass and are billed to 'unassigned'."""
    async for st in _stack(tmp_path, gateway={"require_key": False}):
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                st.url + "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
            ) as r,
        ):
            assert r.status == 200
        assert st.tokens("unassigned", "input") > 0


async def test_upstream_errors_pass_through_and_are_counted(stack: Stack) -> None:
    """Upstream 500 and 429 reach the client unchanged and count as upstream_error."""
    client = _oai(stack)
    stack.upstream.inject("http_500")
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    stack.upstream.inject("http_429")
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert stack.requests("upstream_error", "marketing") == 2
    assert stack.tokens("marketing", "input") == 0


async def test_upstream_timeout_is_504_and_unreachable_is_502(tmp_path: Path) -> None:
    """A slow upstream gives 504, a closed port 502, both OpenAI-style and counted."""
    async with FakeUpstream() as upstream:
        cfg = fake_config(upstream.url, tmp_path)
        data = cfg.model_dump()
        data["upstreams"][0]["timeout"] = 0.5
        data["upstreams"][2]["base_url"] = "http://127.0.0.1:9/v1"
        from tokenfuse.config import parse_config

        cfg = parse_config(data)
        registry = CollectorRegistry()
        async with GatewayServer(cfg, port=0, registry=registry, environ=ENV, enforce=False) as server:
            st = Stack(upstream, server, registry)
            h = {"Authorization": f"Bearer {KEYS['support']}"}
            async with aiohttp.ClientSession() as s:
                upstream.inject("timeout")
                async with s.post(server.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []},
                                  headers=h) as r:  # fmt: skip
                    assert r.status == 504
                    assert (await r.json())["error"]["code"] == "upstream_timeout"
                async with s.post(server.url + "/v1/chat/completions",
                                  json={"model": "deepseek-chat", "messages": []}, headers=h) as r:  # fmt: skip
                    assert r.status == 502
                    assert (await r.json())["error"]["code"] == "upstream_unreachable"
            assert st.requests("upstream_error", "support") == 2


async def test_cut_stream_is_still_metered(stack: Stack) -> None:
    """A stream the upstream cuts mid-way is metered (estimated) and counted as estimated."""
    stack.upstream.inject("cut")
    async with aiohttp.ClientSession() as s:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "tell me a story"}], "stream": True,
                "max_tokens": 40}  # fmt: skip
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.post(stack.url + "/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {KEYS['marketing']}"}) as r:  # fmt: skip
                await r.read()
    assert stack.tokens("marketing", "input") > 0
    est = sum(
        s.value
        for fam in stack.registry.collect()
        for s in fam.samples
        if s.name == "tokenfuse_estimated_requests_total"
    )
    assert est == 1


async def test_metrics_health_and_models(stack: Stack) -> None:
    """/metrics speaks Prometheus text and OpenMetrics on request; health, readiness and model list answer."""
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.url + "/metrics") as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
            assert "tokenfuse_requests_total" in await r.text()
        async with s.get(stack.url + "/metrics", headers={"Accept": "application/openmetrics-text"}) as r:
            assert r.headers["content-type"].startswith("application/openmetrics-text")
            assert (await r.text()).rstrip().endswith("# EOF")
        async with s.get(stack.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(stack.url + "/readyz") as r:
            assert r.status == 200
        async with s.get(stack.url + "/v1/models") as r:
            ids = {m["id"] for m in (await r.json())["data"]}
            assert "claude-*" in ids
        async with s.get(stack.url + "/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_route"


async def test_stream_chunks_pass_through_without_buffering(tmp_path: Path) -> None:
    """The client gets the first SSE chunk while the upstream is still streaming: nothing waits for the whole body."""
    async with FakeUpstream(chunk_delay=0.1) as upstream:
        cfg = fake_config(upstream.url, tmp_path)
        async with GatewayServer(cfg, port=0, registry=CollectorRegistry(), environ=ENV, enforce=False) as server:
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10, "stream": True}
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    server.url + "/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {KEYS['support']}"},
                ) as r,
            ):
                first = await r.content.readany()
                assert first.startswith(b"data: ")
                # 10 tokens 0.1 s apart: the upstream has not reached its final (usage) chunk yet.
                assert upstream.requests[-1].usage is None
                rest = await r.read()
            assert rest.rstrip().endswith(b"data: [DONE]")
            assert upstream.requests[-1].usage is not None
