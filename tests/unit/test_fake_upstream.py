"""The fake upstream: wire shapes the official SDKs accept, exact and steerable usage, faults, and its request record.

Covers OpenAI, Anthropic and Gemini's native API, and the routes that report no usage (Anthropic count_tokens,
stored OpenAI Responses objects).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from tests.conftest import FIXTURES as TEST_FIXTURES

from tokenfuse.testing import (
    FAULTS,
    USAGE_KEYS,
    FakeUpstream,
    FakeUpstreamThread,
    fake_completion_tokens,
    fake_prompt_tokens,
)

FIXTURES = TEST_FIXTURES / "provider-payloads"
CLAUDE = "claude-sonnet-4-6"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there, fake!"},
]
CHAT: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES}
CHAT_PROMPT_TOKENS = 10  # (14 + 18) // 4 + 2 messages
ZERO = dict.fromkeys(USAGE_KEYS, 0)
GEMINI_MODEL = "gemini-2.5-flash"
GEMINI: dict[str, Any] = {
    "systemInstruction": {"parts": [{"text": "You are terse."}]},
    "contents": [{"role": "user", "parts": [{"text": "Hello there, fake!"}]}],
}
GEMINI_PROMPT_TOKENS = 10  # the same texts as CHAT: (14 + 18) // 4 + 2 units


def usage(**counts: int) -> dict[str, int]:
    return {**ZERO, **counts}


def sse_data(text: str) -> list[Any]:
    """Payloads of the ``data:`` lines of an SSE body, JSON-decoded; ``[DONE]`` stays a string."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of every complete event in an SSE body."""
    out: list[tuple[str, dict[str, Any]]] = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
        datas = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        if names and datas:
            out.append((names[0], json.loads(datas[0])))
    return out


def key_tree(obj: Any) -> Any:
    """The nested key structure of a JSON value (dict keys only), to compare shapes without values."""
    if isinstance(obj, dict):
        return {k: key_tree(v) for k, v in obj.items()}
    return None


def fixture(name: str) -> dict[str, Any]:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"provider fixture {path} is missing; it ships in tests/fixtures/provider-payloads")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def http(upstream: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.url, timeout=10.0) as client:
        yield client


@pytest.fixture
def threaded() -> Iterator[FakeUpstream]:
    with FakeUpstreamThread() as up:
        yield up


# google-genai's async client subclasses aiohttp.ClientSession, which aiohttp warns about once per process.
AIO_WARNING = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")


def gemini_client(url: str, api_version: str = "v1beta", headers: dict[str, str] | None = None) -> genai.Client:
    return genai.Client(
        api_key="k", http_options=types.HttpOptions(base_url=url, api_version=api_version, headers=headers)
    )


def as_recorded(meta: types.GenerateContentResponseUsageMetadata | None) -> dict[str, int]:
    """Gemini usageMetadata as a recorded usage dict (thoughts are output), after checking its total adds up."""
    assert meta is not None and meta.prompt_token_count is not None and meta.candidates_token_count is not None
    thoughts = meta.thoughts_token_count or 0
    assert meta.total_token_count == meta.prompt_token_count + meta.candidates_token_count + thoughts
    return usage(
        input_tokens=meta.prompt_token_count,
        output_tokens=meta.candidates_token_count + thoughts,
        cache_read_tokens=meta.cached_content_token_count or 0,
        output_reasoning_tokens=thoughts,
    )


def gemini_sse(text: str) -> list[dict[str, Any]]:
    """The chunks of a Gemini SSE body, checking its framing: ``data: {json}`` events each ended by CRLF CRLF."""
    assert text.endswith("\r\n\r\n")
    events = text.split("\r\n\r\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [json.loads(e[len("data: ") :]) for e in events]


# ---------------------------------------------------------------------------------------------------------------------
# the documented usage functions


def test_fake_prompt_tokens_counts_chars_over_four_plus_one_per_unit() -> None:
    """Prompt tokens are total text characters // 4 plus one per message/text unit, across every API shape."""
    assert fake_prompt_tokens(CHAT) == CHAT_PROMPT_TOKENS
    parts = [
        {"type": "text", "text": "abcd"},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "efgh"},
    ]
    assert fake_prompt_tokens({"messages": [{"role": "user", "content": parts}]}) == 8 // 4 + 1
    assert fake_prompt_tokens({"messages": [{"role": "assistant", "content": None, "tool_calls": []}]}) == 1
    assert fake_prompt_tokens({"system": "sys!", "messages": [{"role": "user", "content": "12345678"}]}) == 12 // 4 + 2
    assert fake_prompt_tokens({"instructions": "be nice", "input": "Hello"}) == 12 // 4 + 2
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "abcdefgh"}]},
        {"type": "function_call_output", "call_id": "c", "output": "x"},
    ]
    assert fake_prompt_tokens({"input": items}) == 8 // 4 + 2
    assert fake_prompt_tokens({"input": ["abcd", "efghijkl"]}) == 12 // 4 + 2
    assert fake_prompt_tokens({"input": [101, 102, 103]}) == 3
    assert fake_prompt_tokens({"prompt": "Say this is a test"}) == 18 // 4 + 1
    assert fake_prompt_tokens({"prompt": "x" * 4000}) == 1001


def test_fake_prompt_tokens_is_at_least_one() -> None:
    """A body without any text still reports one input token, never zero."""
    assert fake_prompt_tokens({}) == 1
    assert fake_prompt_tokens({"messages": []}) == 1


def test_fake_prompt_tokens_counts_gemini_contents_and_system_instruction() -> None:
    """Gemini's systemInstruction and each contents item are units whose text is their parts' text, either spelling."""
    assert fake_prompt_tokens(GEMINI) == GEMINI_PROMPT_TOKENS == fake_prompt_tokens(CHAT)
    body = {
        "system_instruction": {"parts": [{"text": "sys!"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "abcd"}, {"inlineData": {"mimeType": "image/png"}}, {"text": "efgh"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
        ],
    }
    assert fake_prompt_tokens(body) == 12 // 4 + 3
    assert fake_prompt_tokens({"systemInstruction": "12345678", "contents": []}) == 8 // 4 + 1


def test_fake_completion_tokens_is_the_limit_capped_by_the_default() -> None:
    """Output tokens are min(first of max_tokens/max_completion_tokens/max_output_tokens, default)."""
    assert fake_completion_tokens({}) == 16
    assert fake_completion_tokens({}, default=4) == 4
    assert fake_completion_tokens({"max_tokens": 5}) == 5
    assert fake_completion_tokens({"max_tokens": 500}) == 16
    assert fake_completion_tokens({"max_completion_tokens": 3}) == 3
    assert fake_completion_tokens({"max_output_tokens": 7}) == 7
    assert fake_completion_tokens({"max_tokens": 2, "max_completion_tokens": 9}) == 2
    assert fake_completion_tokens({"max_tokens": 0}) == 0
    assert fake_completion_tokens({"max_tokens": True}) == 16
    assert fake_completion_tokens({"generationConfig": {"maxOutputTokens": 4}}) == 4
    assert fake_completion_tokens({"generation_config": {"max_output_tokens": 6}}) == 6


# ---------------------------------------------------------------------------------------------------------------------
# wire shapes, driven with plain HTTP clients


async def test_chat_json_reports_exact_usage_and_echoes_model(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """A non-streamed chat answers max_tokens words, echoes the model, and records the usage it put on the wire."""
    r = await http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o-mini", "max_tokens": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["message"]["content"].split()) == 5
    assert body["usage"] == {
        "prompt_tokens": CHAT_PROMPT_TOKENS,
        "completion_tokens": 5,
        "total_tokens": CHAT_PROMPT_TOKENS + 5,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    rec = upstream.requests[-1]
    assert (rec.method, rec.path, rec.api, rec.status, rec.stream) == (
        "POST",
        "/v1/chat/completions",
        "openai.chat",
        200,
        False,
    )
    assert rec.body == {**CHAT, "model": "gpt-4o-mini", "max_tokens": 5}
    assert rec.usage == usage(input_tokens=CHAT_PROMPT_TOKENS, output_tokens=5)


async def test_chat_default_answer_finishes_with_stop(http: httpx.AsyncClient) -> None:
    """Without a limit the natural answer of default_completion_tokens words ends with finish_reason stop."""
    body = (await http.post("/v1/chat/completions", json=CHAT)).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 16 == len(body["choices"][0]["message"]["content"].split())


async def test_chat_json_shape_matches_recorded_openai_payload(http: httpx.AsyncClient) -> None:
    """The chat JSON carries the same keys (nested) as a recorded real OpenAI response."""
    real = fixture("openai-chat-nonstream-usage.json")["response_body"]
    body = (await http.post("/v1/chat/completions", json=CHAT)).json()
    assert key_tree(body["usage"]) == key_tree(real["usage"])
    assert set(body) == set(real)
    assert set(body["choices"][0]) == set(real["choices"][0])
    assert set(body["choices"][0]["message"]) == set(real["choices"][0]["message"])


async def test_chat_stream_with_include_usage_matches_openai(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """With include_usage every chunk has usage null except a last choices-less usage chunk, then [DONE]."""
    req = {**CHAT, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
    r = await http.post("/v1/chat/completions", json=req)
    assert r.headers["content-type"].startswith("text/event-stream")
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gpt-4o" for c in chunks)
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == CHAT_PROMPT_TOKENS and last["usage"]["completion_tokens"] == 6
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert len(text.split()) == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    real = [c for c in sse_data(fixture("openai-chat-stream-usage.json")["response_sse"]) if c != "[DONE]"]
    assert key_tree(last["usage"]) == key_tree(real[-1]["usage"])
    assert set(chunks[1]) <= set(real[1])
    assert upstream.requests[-1].stream is True
    assert upstream.requests[-1].usage == usage(input_tokens=CHAT_PROMPT_TOKENS, output_tokens=6)


async def test_chat_stream_without_include_usage_reports_nothing(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """Without stream_options.include_usage a chat stream has no usage key at all, and none is recorded."""
    r = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "stream": True})
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    assert all("usage" not in c and c["choices"] for c in data[:-1])
    assert upstream.requests[-1].usage is None
    assert upstream.reported_totals() == ZERO


async def test_usage_header_steers_reported_numbers_exactly(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """x-fake-usage sets the reported numbers exactly; the visible answer has output minus reasoning words."""
    steer = {"prompt_tokens": 100, "completion_tokens": 20, "cached_tokens": 10, "reasoning_tokens": 5}
    r = await http.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 3}, headers={"x-fake-usage": json.dumps(steer)}
    )
    body = r.json()
    u = body["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (100, 20, 120)
    assert u["prompt_tokens_details"]["cached_tokens"] == 10
    assert u["completion_tokens_details"]["reasoning_tokens"] == 5
    assert len(body["choices"][0]["message"]["content"].split()) == 15
    assert body["choices"][0]["finish_reason"] == "stop"
    expected = usage(input_tokens=100, output_tokens=20, cache_read_tokens=10, output_reasoning_tokens=5)
    assert upstream.requests[-1].usage == expected


async def test_set_usage_applies_until_cleared_and_header_overrides_it(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """set_usage steers every request until set_usage(None); a request's header overrides the keys it names."""
    upstream.set_usage({"input_tokens": 40, "output_tokens": 4})
    await http.post("/v1/chat/completions", json=CHAT)
    await http.post("/v1/chat/completions", json=CHAT, headers={"x-fake-usage": '{"output_tokens": 9}'})
    upstream.set_usage(None)
    await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    assert [r.usage for r in upstream.requests] == [
        usage(input_tokens=40, output_tokens=4),
        usage(input_tokens=40, output_tokens=9),
        usage(input_tokens=CHAT_PROMPT_TOKENS, output_tokens=2),
    ]


async def test_bad_steering_is_rejected_with_a_message_naming_the_rule(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """Inconsistent or unknown x-fake-usage keys get HTTP 400 naming the header; set_usage raises ValueError."""
    for header in (
        '{"input_tokens": 5, "cached_tokens": 9}',
        '{"completion_tokens": 1, "reasoning_tokens": 2}',
        '{"tokens": 3}',
        "not json",
        '{"input_tokens": -1}',
        "[1]",
    ):
        r = await http.post("/v1/chat/completions", json=CHAT, headers={"x-fake-usage": header})
        assert r.status_code == 400, header
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "x-fake-usage" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="cache reads and writes included"):
        upstream.set_usage({"input_tokens": 40, "cache_read_tokens": 100})
    with pytest.raises(ValueError, match="unknown key"):
        upstream.set_usage({"bogus": 1})
    assert upstream.reported_totals() == ZERO


async def test_bad_requests_get_provider_shaped_400s_and_keep_the_fault_queue(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """Non-JSON, model-less, or max_tokens-less Anthropic bodies get 400s that do not consume injected faults."""
    upstream.inject("http_500")
    r = await http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = await http.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = await http.post("/v1/messages", json={"model": CLAUDE, "messages": []})
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    r = await http.post("/v1/chat/completions", json=CHAT, headers={"x-fake-fault": "explode"})
    assert r.status_code == 400 and "x-fake-fault" in r.json()["error"]["message"]
    assert [rec.status for rec in upstream.requests] == [400, 400, 400, 400]
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 500


async def test_responses_json_and_stream_report_usage_like_openai(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """Responses JSON carries usage with details; the stream ends with response.completed carrying the same usage."""
    steer = json.dumps({"input_tokens": 30, "cached_tokens": 12, "output_tokens": 9, "reasoning_tokens": 4})
    req = {"model": "gpt-4.1", "input": "Hello", "instructions": "be nice"}
    body = (await http.post("/v1/responses", json=req, headers={"x-fake-usage": steer})).json()
    real = fixture("openai-responses-nonstream-usage.json")["response_body"]
    assert key_tree(body["usage"]) == key_tree(real["usage"])
    assert set(real) <= set(body) | {"reasoning"}
    assert body["usage"] == {
        "input_tokens": 30,
        "input_tokens_details": {"cached_tokens": 12},
        "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 4},
        "total_tokens": 39,
    }
    assert len(body["output"][0]["content"][0]["text"].split()) == 5

    r = await http.post("/v1/responses", json={**req, "stream": True, "max_output_tokens": 4})
    events = sse_events(r.text)
    names = [n for n, _ in events]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names.count("response.output_text.delta") == 4
    assert names[-1] == "response.completed"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert all(d["type"] == n for n, d in events)
    assert events[0][1]["response"]["usage"] is None
    completed = events[-1][1]["response"]
    assert completed["usage"]["input_tokens"] == 5 == fake_prompt_tokens(req)
    assert completed["usage"]["output_tokens"] == 4
    real_events = sse_events(fixture("openai-responses-stream-usage.json")["response_sse"])
    assert [n for n, _ in real_events if n != "response.output_text.delta"] == [
        n for n, _ in events if n != "response.output_text.delta"
    ]
    assert key_tree(completed["usage"]) == key_tree(real_events[-1][1]["response"]["usage"])
    assert [rec.usage for rec in upstream.requests] == [
        usage(input_tokens=30, output_tokens=9, cache_read_tokens=12, output_reasoning_tokens=4),
        usage(input_tokens=5, output_tokens=4),
    ]


async def test_anthropic_wire_input_excludes_cache_but_record_includes_it(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """Anthropic's input_tokens on the wire is input minus cache reads and writes; the record keeps total input."""
    steer = json.dumps({"input_tokens": 50, "cache_read_tokens": 20, "cache_write_tokens": 10, "output_tokens": 7})
    req = {"model": CLAUDE, "max_tokens": 100, "system": "sys!", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01", "x-fake-usage": steer}
    body = (await http.post("/v1/messages", json=req, headers=headers)).json()
    assert body["type"] == "message" and body["model"] == CLAUDE and body["stop_reason"] == "end_turn"
    assert body["usage"] == {
        "input_tokens": 20,
        "cache_creation_input_tokens": 10,
        "cache_read_input_tokens": 20,
        "output_tokens": 7,
    }
    real = fixture("anthropic-messages-cache-read.json")["response_body"]
    assert set(body["usage"]) <= set(real["usage"])
    assert set(body) == set(real)
    rec = upstream.requests[-1]
    assert rec.headers["x-api-key"] == "sk-ant-test" and rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.usage == usage(input_tokens=50, output_tokens=7, cache_read_tokens=20, cache_write_tokens=10)


async def test_anthropic_stream_events_and_usage(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """An Anthropic stream has message_start (input usage, output 1), text deltas, message_delta (final output)."""
    req = {"model": CLAUDE, "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "12345678"}]}
    events = sse_events((await http.post("/v1/messages", json=req)).text)
    names = [n for n, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]["usage"]
    assert start == {
        "input_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    delta = events[-2][1]
    assert delta["usage"]["output_tokens"] == 3 and delta["delta"]["stop_reason"] == "max_tokens"
    real = sse_events(fixture("anthropic-messages-stream-thinking.json")["response_sse"])
    assert set(start) <= set(real[0][1]["message"]["usage"])
    assert set(delta["usage"]) == set(real[-2][1]["usage"])
    assert upstream.requests[-1].usage == usage(input_tokens=3, output_tokens=3)


async def test_embeddings_float_and_base64_vectors(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """Embeddings return one small deterministic vector per input (base64 float32 on request) and input usage."""
    req = {"model": "text-embedding-3-small", "input": ["abcd", "efghijkl"]}
    plain = (await http.post("/v1/embeddings", json=req)).json()
    assert [d["index"] for d in plain["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 8 for d in plain["data"])
    assert plain["data"][0]["embedding"] != plain["data"][1]["embedding"]
    assert plain["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    b64 = (await http.post("/v1/embeddings", json={**req, "encoding_format": "base64", "dimensions": 4})).json()
    raw = base64.b64decode(b64["data"][1]["embedding"])
    assert struct.unpack("<4f", raw) == pytest.approx(plain["data"][1]["embedding"][:4], abs=1e-6)
    again = (await http.post("/v1/embeddings", json=req)).json()
    assert again["data"] == plain["data"]
    assert [r.usage for r in upstream.requests] == [usage(input_tokens=5)] * 3


async def test_legacy_completions_json_and_stream(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """Legacy completions answer text with prompt/completion usage, streamed with an include_usage last chunk."""
    req = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 4}
    body = (await http.post("/v1/completions", json=req)).json()
    assert body["object"] == "text_completion" and len(body["choices"][0]["text"].split()) == 4
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    r = await http.post("/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    assert data[-2]["choices"] == [] and data[-2]["usage"]["completion_tokens"] == 4
    assert "".join(c["choices"][0]["text"] for c in data[:-2]) == body["choices"][0]["text"]
    assert upstream.reported_totals() == usage(input_tokens=10, output_tokens=8)


async def test_routes_answer_with_and_without_v1_prefix(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """Every route works with and without /v1, and GET /models lists models."""
    for path in ("/chat/completions", "/v1/chat/completions"):
        assert (await http.post(path, json=CHAT)).status_code == 200
    assert (await http.post("/messages", json={"model": CLAUDE, "max_tokens": 1, "messages": []})).status_code == 200
    for path in ("/models", "/v1/models"):
        listed = (await http.get(path)).json()
        assert listed["object"] == "list" and {"gpt-4o", CLAUDE} <= {m["id"] for m in listed["data"]}
    assert [r.path for r in upstream.requests] == [
        "/chat/completions",
        "/v1/chat/completions",
        "/messages",
        "/models",
        "/v1/models",
    ]
    assert upstream.requests[-1].usage is None


async def test_aiohttp_client_and_chunk_delay_give_the_same_stream(upstream: FakeUpstream) -> None:
    """With chunk_delay the stream arrives piece by piece but carries the same events as without it."""
    req = {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as s:
        async with s.post(upstream.url + "/v1/chat/completions", json=req) as r:
            fast = sse_data(await r.text())
        upstream.chunk_delay = 0.01
        async with s.post(upstream.url + "/v1/chat/completions", json=req) as r:
            reads = [chunk async for chunk in r.content.iter_any()]
    slow = sse_data(b"".join(reads).decode())
    assert len(reads) > 1
    assert [c if c == "[DONE]" else (c["choices"], c["usage"]) for c in slow] == [
        c if c == "[DONE]" else (c["choices"], c["usage"]) for c in fast
    ]


# ---------------------------------------------------------------------------------------------------------------------
# faults


async def test_http_errors_by_header_and_by_queue(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """http_500/http_429 come from the header or the queue (in order); the header does not consume the queue."""
    upstream.retry_after = 2
    upstream.inject("http_429", count=2)
    upstream.inject("http_500")
    r = await http.post("/v1/chat/completions", json=CHAT, headers={"x-fake-fault": "http_500"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    statuses = [(await http.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(4)]
    assert statuses == [429, 429, 500, 200]
    r = await http.post(
        "/v1/messages", json={"model": CLAUDE, "max_tokens": 5, "messages": []}, headers={"x-fake-fault": "http_429"}
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert [(rec.fault, rec.status, rec.usage) for rec in upstream.requests[:4]] == [
        ("http_500", 500, None),
        ("http_429", 429, None),
        ("http_429", 429, None),
        ("http_500", 500, None),
    ]
    assert upstream.requests[4].fault is None and upstream.requests[4].usage is not None
    assert upstream.reported_totals()["output_tokens"] == 16


def test_inject_rejects_unknown_faults() -> None:
    """inject() names the known faults when given an unknown one."""
    with pytest.raises(ValueError, match="http_500"):
        FakeUpstream().inject("http_418")
    assert {"http_500", "http_429", "timeout", "cut", "no_usage", "slow_first_chunk"} == FAULTS


async def test_cut_stream_stops_mid_way_without_usage_or_done(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """A cut chat stream drops the connection after some content: the client errors, no usage, no [DONE]."""
    req = {**CHAT, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("POST", "/v1/chat/completions", json=req, headers={"x-fake-fault": "cut"}) as r:
            async for chunk in r.aiter_bytes():
                received += chunk
    data = sse_data(received.decode())
    assert 1 < len(data) < 10
    assert "[DONE]" not in data and all(c["usage"] is None for c in data)
    assert upstream.requests[-1].usage is None and upstream.requests[-1].fault == "cut"


async def test_cut_json_body_is_truncated(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """A cut non-stream answer promises a full Content-Length and closes half-way."""
    upstream.inject("cut")
    with pytest.raises(httpx.RemoteProtocolError, match="expected"):
        await http.post("/v1/responses", json={"model": "gpt-4.1", "input": "x"})
    assert upstream.requests[-1].usage is None
    assert upstream.reported_totals() == ZERO


async def test_cut_anthropic_stream_records_only_message_start_usage(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """A cut Anthropic stream has sent message_start (input usage, output 1) but no message_delta."""
    req = {"model": CLAUDE, "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("POST", "/v1/messages", json=req, headers={"x-fake-fault": "cut"}) as r:
            async for chunk in r.aiter_bytes():
                received += chunk
    names = [n for n, _ in sse_events(received.decode())]
    assert names[0] == "message_start" and "content_block_delta" in names and "message_delta" not in names
    assert upstream.requests[-1].usage == usage(input_tokens=1, output_tokens=1)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}),
        ("/v1/responses", {"model": "gpt-4.1", "input": "hi"}),
        (
            "/v1/completions",
            {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream_options": {"include_usage": True}},
        ),
        ("/v1/messages", {"model": CLAUDE, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
    ],
)
async def test_no_usage_fault_answers_without_usage_anywhere(
    upstream: FakeUpstream, http: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    """no_usage gives a valid answer, streamed or not, that carries no usage value at all."""
    headers = {"x-fake-fault": "no_usage"}
    plain = (await http.post(path, json=body, headers=headers)).json()
    assert plain.get("usage") is None
    streamed = await http.post(path, json={**body, "stream": True}, headers=headers)
    text = streamed.text
    assert streamed.status_code == 200 and text.strip()
    assert '"usage":{' not in text and "prompt_tokens" not in text and "input_tokens" not in text
    assert [r.usage for r in upstream.requests] == [None, None]
    assert upstream.reported_totals() == ZERO


async def test_no_usage_fault_on_embeddings(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """no_usage embeddings still return vectors, without a usage object."""
    upstream.inject("no_usage")
    body = (await http.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})).json()
    assert "usage" not in body and len(body["data"]) == 1


async def test_timeout_holds_the_request_until_the_client_gives_up(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """The timeout fault outlasts the client's timeout; the request is recorded but gets no status or usage."""
    upstream.inject("timeout")
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/v1/chat/completions", json=CHAT, timeout=0.2)
    assert (upstream.requests[-1].fault, upstream.requests[-1].status) == ("timeout", None)
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_stop_releases_requests_held_by_timeout() -> None:
    """stop() wakes a request held by the timeout fault and drops its connection instead of waiting an hour."""
    up = FakeUpstream()
    await up.start()
    async with httpx.AsyncClient(base_url=up.url, timeout=30.0) as client:
        held = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers={"x-fake-fault": "timeout"}))
        for _ in range(1000):  # until the request is in (bounded: the test must not hang)
            if up.requests:
                break
            await asyncio.sleep(0.01)
        assert up.requests and up.requests[0].fault == "timeout"
        await asyncio.wait_for(up.stop(), timeout=10)
        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(held, timeout=10)
    assert up.requests[0].usage is None


async def test_slow_first_chunk_sends_headers_then_waits(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """slow_first_chunk sends stream headers at once and the first body byte only after the configured pause."""
    upstream.slow_first_chunk_seconds = 0.3
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/chat/completions", json=req, headers={"x-fake-fault": "slow_first_chunk"}) as r:
        headers_at = time.monotonic()
        assert r.status_code == 200
        body = b"".join([chunk async for chunk in r.aiter_bytes()])
        waited = time.monotonic() - headers_at
    assert waited >= 0.25
    assert sse_data(body.decode())[-1] == "[DONE]"
    assert upstream.requests[-1].usage == usage(input_tokens=CHAT_PROMPT_TOKENS, output_tokens=16)


async def test_latency_delays_the_answer(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """Server latency and the x-fake-latency header delay the answer by at least that long; bad values are 400."""
    upstream.latency = 0.2
    t0 = time.monotonic()
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    t1 = time.monotonic()
    assert (await http.post("/v1/chat/completions", json=CHAT, headers={"x-fake-latency": "0.3"})).status_code == 200
    t2 = time.monotonic()
    assert t1 - t0 >= 0.19 and t2 - t1 >= 0.29
    r = await http.post("/v1/chat/completions", json=CHAT, headers={"x-fake-latency": "soon"})
    assert r.status_code == 400


async def test_reported_totals_and_reset(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """reported_totals sums every reported usage by key; reset forgets requests, totals, faults and overrides."""
    await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    await http.post(
        "/v1/messages",
        json={"model": CLAUDE, "max_tokens": 3, "messages": []},
        headers={"x-fake-usage": '{"input_tokens": 30, "cache_creation_input_tokens": 25}'},
    )
    assert upstream.reported_totals() == usage(
        input_tokens=CHAT_PROMPT_TOKENS + 30, output_tokens=5, cache_write_tokens=25
    )
    upstream.inject("http_500")
    upstream.set_usage({"input_tokens": 1})
    upstream.reset()
    assert upstream.requests == [] and upstream.reported_totals() == ZERO
    body = (await http.post("/v1/chat/completions", json=CHAT)).json()
    assert body["usage"]["prompt_tokens"] == CHAT_PROMPT_TOKENS


async def test_record_off_keeps_totals_only() -> None:
    """With record=False nothing is kept per request, but reported_totals still adds up."""
    async with FakeUpstream(record=False, default_completion_tokens=3) as up, httpx.AsyncClient() as client:
        await client.post(up.url + "/v1/chat/completions", json=CHAT)
        await client.post(up.url + "/v1/chat/completions", json=CHAT)
    assert up.requests == []
    assert up.reported_totals() == usage(input_tokens=2 * CHAT_PROMPT_TOKENS, output_tokens=6)


# ---------------------------------------------------------------------------------------------------------------------
# the official SDKs as clients


def test_openai_sdk_chat_stream_and_not(threaded: FakeUpstream) -> None:
    """The openai SDK parses chat answers and the include_usage chunk; its numbers equal the recorded usage."""
    client = openai.OpenAI(base_url=threaded.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=4)
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (CHAT_PROMPT_TOKENS, 4)
    assert r.choices[0].finish_reason == "length" and r.model == "gpt-4o"
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-usage": json.dumps({"prompt_tokens": 77, "cached_tokens": 7, "completion_tokens": 3})},
    )
    chunks = list(stream)
    final = chunks[-1].usage
    assert final is not None and final.prompt_tokens_details is not None
    assert (final.prompt_tokens, final.completion_tokens, final.prompt_tokens_details.cached_tokens) == (77, 3, 7)
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split() != []
    assert [rec.usage for rec in threaded.requests] == [
        usage(input_tokens=CHAT_PROMPT_TOKENS, output_tokens=4),
        usage(input_tokens=77, output_tokens=3, cache_read_tokens=7),
    ]


def test_openai_sdk_responses_stream_completed_usage(threaded: FakeUpstream) -> None:
    """The openai SDK's Responses client reads usage from JSON and from the stream's response.completed."""
    client = openai.OpenAI(base_url=threaded.url + "/v1", api_key="x", max_retries=0)
    r = client.responses.create(model="gpt-4.1", input="Hello", instructions="be nice", max_output_tokens=5)
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (5, 5)
    assert len(r.output_text.split()) == 5
    steer = {"input_tokens": 300, "cached_tokens": 100, "output_tokens": 12, "reasoning_tokens": 8}
    with client.responses.stream(model="gpt-5", input="Hello", extra_headers={"x-fake-usage": json.dumps(steer)}) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.input_tokens_details.cached_tokens) == (300, 100)
    assert (final.usage.output_tokens, final.usage.output_tokens_details.reasoning_tokens) == (12, 8)
    assert "".join(deltas) == final.output_text and len(deltas) == 4
    assert threaded.requests[-1].usage == usage(
        input_tokens=300, output_tokens=12, cache_read_tokens=100, output_reasoning_tokens=8
    )


def test_openai_sdk_embeddings_completions_and_models(threaded: FakeUpstream) -> None:
    """The openai SDK parses embeddings (float and base64), legacy completions and the model list."""
    client = openai.OpenAI(base_url=threaded.url + "/v1", api_key="x", max_retries=0)
    e = client.embeddings.create(model="text-embedding-3-small", input=["abcd", "efghijkl"])
    assert e.usage.prompt_tokens == 5 and len(e.data) == 2 and len(e.data[0].embedding) == 8
    e64 = client.embeddings.create(model="text-embedding-3-small", input="abcd", encoding_format="base64")
    vector = struct.unpack("<8f", base64.b64decode(str(e64.data[0].embedding)))
    assert vector == pytest.approx(e.data[0].embedding, abs=1e-6)
    c = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this is a test", max_tokens=3)
    assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens) == (5, 3)
    assert "gpt-4o" in {m.id for m in client.models.list()}


def test_anthropic_sdk_messages_and_stream_final_usage(threaded: FakeUpstream) -> None:
    """The anthropic SDK parses messages and accumulates get_final_message().usage from the stream."""
    client = anthropic.Anthropic(base_url=threaded.url, api_key="sk-ant-x", max_retries=0)
    steer = {"input_tokens": 1200, "cache_read_tokens": 1000, "cache_write_tokens": 150, "output_tokens": 9}
    m = client.messages.create(
        model=CLAUDE,
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-usage": json.dumps(steer)},
    )
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.cache_creation_input_tokens) == (
        50,
        1000,
        150,
    )
    assert m.usage.output_tokens == 9 and m.model == CLAUDE
    with client.messages.stream(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "12345678"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 5)
    assert final.stop_reason == "max_tokens" and len(text.split()) == 5
    sent = threaded.requests[0].headers
    assert "sk-ant-x" in sent.get("x-api-key", sent.get("authorization", ""))
    assert "anthropic-version" in threaded.requests[0].headers
    assert [rec.usage for rec in threaded.requests] == [
        usage(input_tokens=1200, output_tokens=9, cache_read_tokens=1000, cache_write_tokens=150),
        usage(input_tokens=3, output_tokens=5),
    ]


def test_sdks_raise_their_own_errors_for_injected_faults(threaded: FakeUpstream) -> None:
    """Injected 429/500 become the SDKs' RateLimitError/InternalServerError; retries consume the fault queue."""
    oai = openai.OpenAI(base_url=threaded.url + "/v1", api_key="x", max_retries=0)
    ant = anthropic.Anthropic(base_url=threaded.url, api_key="x", max_retries=0)
    threaded.inject("http_429")
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    threaded.inject("http_500")
    with pytest.raises(anthropic.InternalServerError):
        ant.messages.create(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    threaded.retry_after = 0.01
    threaded.inject("http_429")
    retrying = openai.OpenAI(base_url=threaded.url + "/v1", api_key="x", max_retries=1)
    r = retrying.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens == 2
    assert [rec.status for rec in threaded.requests] == [429, 500, 429, 200]


async def test_async_sdks_against_the_in_loop_server(upstream: FakeUpstream) -> None:
    """AsyncOpenAI and AsyncAnthropic work against a FakeUpstream on the test's own event loop."""
    oai = openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="x", max_retries=0)
    stream = await oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    last = [c async for c in stream][-1]
    assert last.usage is not None and last.usage.completion_tokens == 3
    ant = anthropic.AsyncAnthropic(base_url=upstream.url, api_key="x", max_retries=0)
    async with ant.messages.stream(model=CLAUDE, max_tokens=2, messages=[{"role": "user", "content": "hi"}]) as s:
        final = await s.get_final_message()
    assert final.usage.output_tokens == 2
    assert upstream.reported_totals() == usage(input_tokens=CHAT_PROMPT_TOKENS + 1, output_tokens=5)
    await oai.close()
    await ant.close()


# ---------------------------------------------------------------------------------------------------------------------
# Gemini's native API


async def test_gemini_json_shape_usage_and_record(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """generateContent answers the path's model with a recorded-Gemini-shaped body, usageMetadata and record."""
    req = {**GEMINI, "generationConfig": {"maxOutputTokens": 5}}
    r = await http.post(f"/v1beta/models/{GEMINI_MODEL}:generateContent", json=req, headers={"x-goog-api-key": "gk"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    real = fixture("google-generatecontent-thinking-video.json")["response_body"]
    assert set(body) == set(real)
    assert set(body["candidates"][0]) == set(real["candidates"][0])
    assert body["modelVersion"] == GEMINI_MODEL and body["responseId"]
    candidate = body["candidates"][0]
    assert candidate["content"]["role"] == "model" and candidate["finishReason"] == "MAX_TOKENS"
    assert len(candidate["content"]["parts"][0]["text"].split()) == 5
    assert body["usageMetadata"] == {
        "promptTokenCount": GEMINI_PROMPT_TOKENS,
        "candidatesTokenCount": 5,
        "totalTokenCount": GEMINI_PROMPT_TOKENS + 5,
    }
    rec = upstream.requests[-1]
    assert (rec.method, rec.path, rec.api, rec.status, rec.stream) == (
        "POST",
        f"/v1beta/models/{GEMINI_MODEL}:generateContent",
        "google.generate_content",
        200,
        False,
    )
    assert rec.headers["x-goog-api-key"] == "gk" and rec.body == req
    assert rec.usage == usage(input_tokens=GEMINI_PROMPT_TOKENS, output_tokens=5)
    natural = (await http.post("/v1/models/gemini-2.0-flash:generateContent", json=GEMINI)).json()
    assert natural["candidates"][0]["finishReason"] == "STOP" and natural["modelVersion"] == "gemini-2.0-flash"
    assert natural["usageMetadata"]["candidatesTokenCount"] == 16


async def test_gemini_stream_is_crlf_sse_with_running_usage(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """With alt=sse each word is a data: event ended by CRLF CRLF, every one with running usageMetadata."""
    req = {**GEMINI, "generationConfig": {"maxOutputTokens": 3}}
    r = await http.post(f"/v1beta/models/{GEMINI_MODEL}:streamGenerateContent?alt=sse", json=req)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "event:" not in r.text
    chunks = gemini_sse(r.text)
    assert [c["usageMetadata"]["candidatesTokenCount"] for c in chunks] == [1, 2, 3]
    assert all(c["usageMetadata"]["promptTokenCount"] == GEMINI_PROMPT_TOKENS for c in chunks)
    assert [c["candidates"][0].get("finishReason") for c in chunks] == [None, None, "MAX_TOKENS"]
    assert len("".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks).split()) == 3
    real = gemini_sse(fixture("google-streamgeneratecontent-usage.json")["response_sse"])
    assert set(chunks[-1]) == set(real[-1]) and set(chunks[-1]["candidates"][0]) == set(real[-1]["candidates"][0])
    assert upstream.requests[-1].stream is True
    assert upstream.requests[-1].usage == usage(input_tokens=GEMINI_PROMPT_TOKENS, output_tokens=3)
    array = await http.post(f"/v1beta/models/{GEMINI_MODEL}:streamGenerateContent", json=req)
    assert array.headers["content-type"].startswith("application/json")
    assert [{**c, "responseId": None} for c in array.json()] == [{**c, "responseId": None} for c in chunks]
    assert upstream.requests[-1].stream is False and upstream.requests[-1].usage == upstream.requests[-2].usage


def test_google_sdk_generate_content_and_stream(threaded: FakeUpstream) -> None:
    """google-genai's generate_content and generate_content_stream read usage_metadata equal to the recorded usage."""
    client = gemini_client(threaded.url)
    r = client.models.generate_content(model=GEMINI_MODEL, contents="hi")
    assert r.text is not None and len(r.text.split()) == 16
    assert r.candidates and r.candidates[0].finish_reason == types.FinishReason.STOP
    assert as_recorded(r.usage_metadata) == threaded.requests[-1].usage == usage(input_tokens=1, output_tokens=16)
    config = types.GenerateContentConfig(max_output_tokens=4, system_instruction="You are terse.")
    chunks = list(
        client.models.generate_content_stream(model=GEMINI_MODEL, contents="Hello there, fake!", config=config)
    )
    assert len(chunks) == 4 and len("".join(c.text or "" for c in chunks).split()) == 4
    assert [c.usage_metadata.candidates_token_count for c in chunks if c.usage_metadata] == [1, 2, 3, 4]
    assert chunks[-1].candidates and chunks[-1].candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert as_recorded(chunks[-1].usage_metadata) == threaded.requests[-1].usage
    assert threaded.requests[-1].usage == usage(input_tokens=GEMINI_PROMPT_TOKENS, output_tokens=4)
    assert threaded.requests[-1].stream is True and threaded.requests[-1].headers["x-goog-api-key"] == "k"
    default_version = gemini_client(threaded.url, api_version="v1")
    assert as_recorded(default_version.models.generate_content(model=GEMINI_MODEL, contents="hi").usage_metadata)
    assert threaded.requests[-1].path == f"/v1/models/{GEMINI_MODEL}:generateContent"
    assert threaded.reported_totals() == usage(input_tokens=1 + GEMINI_PROMPT_TOKENS + 1, output_tokens=36)


@AIO_WARNING
async def test_google_async_sdk_against_the_in_loop_server(upstream: FakeUpstream) -> None:
    """google-genai's client.aio generate_content and generate_content_stream work against the in-loop server."""
    client = gemini_client(upstream.url)
    r = await client.aio.models.generate_content(model=GEMINI_MODEL, contents="hi")
    assert as_recorded(r.usage_metadata) == upstream.requests[-1].usage == usage(input_tokens=1, output_tokens=16)
    config = types.GenerateContentConfig(max_output_tokens=2)
    chunks = [
        c
        async for c in await client.aio.models.generate_content_stream(model=GEMINI_MODEL, contents="hi", config=config)
    ]
    assert [c.text for c in chunks] == ["tokens", " flow"]
    assert (
        as_recorded(chunks[-1].usage_metadata) == upstream.requests[-1].usage == usage(input_tokens=1, output_tokens=2)
    )
    assert upstream.reported_totals() == usage(input_tokens=2, output_tokens=18)
    await client.aio.aclose()


def test_gemini_usage_override_reports_cached_and_thoughts(threaded: FakeUpstream) -> None:
    """x-fake-usage and set_usage steer Gemini's usage: cache reads and thoughts get their own fields, both ways."""
    steer = {"input_tokens": 300, "cached_tokens": 120, "output_tokens": 20, "reasoning_tokens": 8}
    client = gemini_client(threaded.url, headers={"x-fake-usage": json.dumps(steer)})
    r = client.models.generate_content(model=GEMINI_MODEL, contents="hi")
    meta = r.usage_metadata
    assert meta is not None
    assert (meta.prompt_token_count, meta.cached_content_token_count) == (300, 120)
    assert (meta.candidates_token_count, meta.thoughts_token_count, meta.total_token_count) == (12, 8, 320)
    assert r.text is not None and len(r.text.split()) == 12
    expected = usage(input_tokens=300, output_tokens=20, cache_read_tokens=120, output_reasoning_tokens=8)
    assert as_recorded(meta) == threaded.requests[-1].usage == expected
    threaded.set_usage({"prompt_tokens": 50, "completion_tokens": 3, "cache_write_tokens": 9})
    plain = gemini_client(threaded.url)  # kept: a collected Client closes its HTTP client mid-stream
    chunks = list(plain.models.generate_content_stream(model=GEMINI_MODEL, contents="hi"))
    threaded.set_usage(None)
    assert len(chunks) == 3 and as_recorded(chunks[-1].usage_metadata) == usage(input_tokens=50, output_tokens=3)
    assert threaded.requests[-1].usage == usage(input_tokens=50, output_tokens=3)  # Gemini has no cache writes


@AIO_WARNING
async def test_gemini_faults_and_errors_are_google_shaped(upstream: FakeUpstream, http: httpx.AsyncClient) -> None:
    """Gemini faults and bad requests answer Google's error shape; the SDK raises ClientError/ServerError."""
    client = gemini_client(upstream.url)
    upstream.retry_after = 3
    upstream.inject("http_429")
    with pytest.raises(genai_errors.ClientError) as limited:
        await client.aio.models.generate_content(model=GEMINI_MODEL, contents="hi")
    assert (limited.value.code, limited.value.status) == (429, "RESOURCE_EXHAUSTED")
    upstream.inject("http_500")
    with pytest.raises(genai_errors.ServerError) as failed:
        await client.aio.models.generate_content(model=GEMINI_MODEL, contents="hi")
    assert (failed.value.code, failed.value.status) == (500, "INTERNAL")
    r = await http.post(
        f"/v1beta/models/{GEMINI_MODEL}:generateContent", json=GEMINI, headers={"x-fake-fault": "http_429"}
    )
    assert r.headers["retry-after"] == "3" and r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    r = await http.post(f"/v1beta/models/{GEMINI_MODEL}:generateContent", json={"contents": []})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "code": 400,
            "message": "* GenerateContentRequest.contents: contents is not specified",
            "status": "INVALID_ARGUMENT",
        }
    }
    r = await http.post(f"/v1beta/models/{GEMINI_MODEL}:countTokens", json=GEMINI)
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    assert [(rec.fault, rec.status, rec.usage) for rec in upstream.requests] == [
        ("http_429", 429, None),
        ("http_500", 500, None),
        ("http_429", 429, None),
        (None, 400, None),
        (None, 404, None),
    ]
    assert upstream.reported_totals() == ZERO
    await client.aio.aclose()


async def test_gemini_cut_stream_records_the_last_running_usage_sent(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """A cut Gemini stream sends half its chunks, then drops; the last chunk's running usage is what is recorded."""
    req = {**GEMINI, "generationConfig": {"maxOutputTokens": 6}}
    path = f"/v1beta/models/{GEMINI_MODEL}:streamGenerateContent?alt=sse"
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("POST", path, json=req, headers={"x-fake-fault": "cut"}) as r:
            async for chunk in r.aiter_bytes():
                received += chunk
    chunks = gemini_sse(received.decode())
    assert [c["usageMetadata"]["candidatesTokenCount"] for c in chunks] == [1, 2, 3]
    assert all("finishReason" not in c["candidates"][0] for c in chunks)
    assert upstream.requests[-1].usage == usage(input_tokens=GEMINI_PROMPT_TOKENS, output_tokens=3)
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post(f"/v1/models/{GEMINI_MODEL}:generateContent", json=GEMINI, headers={"x-fake-fault": "cut"})
    assert upstream.requests[-1].usage is None
    assert upstream.reported_totals() == usage(input_tokens=GEMINI_PROMPT_TOKENS, output_tokens=3)


async def test_gemini_no_usage_fault_has_no_usage_metadata_anywhere(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """no_usage Gemini answers (JSON, SSE, JSON array) carry text but no usageMetadata at all."""
    headers = {"x-fake-fault": "no_usage"}
    base = f"/v1beta/models/{GEMINI_MODEL}"
    for path in (":generateContent", ":streamGenerateContent?alt=sse", ":streamGenerateContent"):
        r = await http.post(base + path, json=GEMINI, headers=headers)
        assert r.status_code == 200 and "tokens" in r.text, path
        assert "usageMetadata" not in r.text and "TokenCount" not in r.text, path
    assert [rec.usage for rec in upstream.requests] == [None, None, None]
    assert upstream.reported_totals() == ZERO


# ---------------------------------------------------------------------------------------------------------------------
# routes that report no usage: Anthropic count_tokens, stored OpenAI Responses objects


def test_anthropic_sdk_count_tokens_is_recorded_but_not_reported(threaded: FakeUpstream) -> None:
    """count_tokens answers fake_prompt_tokens of the body; it is recorded but adds nothing to reported_totals."""
    client = anthropic.Anthropic(base_url=threaded.url, api_key="sk-ant-x", max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "12345678"}]
    counted = client.messages.count_tokens(model=CLAUDE, system="sys!", messages=messages)
    assert counted.input_tokens == fake_prompt_tokens({"system": "sys!", "messages": messages}) == 12 // 4 + 2
    rec = threaded.requests[-1]
    assert (rec.path, rec.api, rec.status, rec.usage) == (
        "/v1/messages/count_tokens",
        "anthropic.count_tokens",
        200,
        None,
    )
    assert rec.body is not None and rec.body["model"] == CLAUDE
    assert "sk-ant-x" in rec.headers.get("x-api-key", rec.headers.get("authorization", ""))
    r = httpx.post(threaded.url + "/v1/messages/count_tokens", json={"messages": messages})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    threaded.inject("http_500")
    with pytest.raises(anthropic.InternalServerError):
        client.messages.count_tokens(model=CLAUDE, messages=messages)
    assert threaded.reported_totals() == ZERO


def test_openai_sdk_retrieves_lists_and_deletes_stored_responses(threaded: FakeUpstream) -> None:
    """Served responses can be retrieved, their input items listed (newest first) and deleted; then they are 404."""
    client = openai.OpenAI(base_url=threaded.url + "/v1", api_key="x", max_retries=0)
    items: list[Any] = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": [{"type": "input_text", "text": "Again"}]},
    ]
    created = client.responses.create(model="gpt-4.1", input=items, instructions="be nice", max_output_tokens=3)
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text and fetched.usage == created.usage
    listed = list(client.responses.input_items.list(created.id))
    assert [(i.type, getattr(i, "role", None)) for i in listed] == [
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert [c.text for i in listed for c in getattr(i, "content", [])] == ["Again", "Hi!", "Hello"]
    page = client.responses.input_items.list(created.id, order="asc", limit=2)
    assert page.has_more is True and [i.id for i in page.data] == [i.id for i in listed[::-1][:2]]
    with client.responses.stream(model="gpt-4.1", input="streamed") as s:
        streamed = s.get_final_response()
    again = client.responses.retrieve(streamed.id)
    assert again.status == "completed" and again.usage == streamed.usage and again.output_text == streamed.output_text
    raw = httpx.get(f"{threaded.url}/v1/responses/{streamed.id}/input_items").json()
    assert raw["object"] == "list" and raw["has_more"] is False
    assert [i["content"] for i in raw["data"]] == [[{"type": "input_text", "text": "streamed"}]]
    assert raw["first_id"] == raw["last_id"] == raw["data"][0]["id"]
    deleted = httpx.delete(f"{threaded.url}/v1/responses/{streamed.id}").json()
    assert deleted == {"id": streamed.id, "object": "response.deleted", "deleted": True}
    client.responses.delete(created.id)
    for rid in (created.id, streamed.id, "resp_unknown"):
        with pytest.raises(openai.NotFoundError, match="not found"):
            client.responses.retrieve(rid)
    unstored = client.responses.create(model="gpt-4.1", input="x", store=False)
    assert unstored.store is False and fetched.store is True
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(unstored.id)
    assert [r.api for r in threaded.requests if r.usage is not None] == ["openai.responses"] * 3
    sent = (
        fake_prompt_tokens({"instructions": "be nice", "input": items})
        + fake_prompt_tokens({"input": "streamed"})
        + fake_prompt_tokens({"input": "x"})
    )
    assert threaded.reported_totals() == usage(input_tokens=sent, output_tokens=3 + 16 + 16)


async def test_stored_responses_are_bounded_and_faults_delete_nothing(
    upstream: FakeUpstream, http: httpx.AsyncClient
) -> None:
    """Only the last responses_kept responses are kept, a faulted DELETE keeps its response, reset forgets all."""
    upstream.responses_kept = 2
    ids = [(await http.post("/v1/responses", json={"model": "gpt-4.1", "input": "x"})).json()["id"] for _ in range(3)]
    assert [(await http.get(f"/v1/responses/{rid}")).status_code for rid in ids] == [404, 200, 200]
    r = await http.delete(f"/v1/responses/{ids[2]}", headers={"x-fake-fault": "http_500"})
    assert r.status_code == 500
    assert (await http.get(f"/responses/{ids[2]}")).json()["id"] == ids[2]
    missing = (await http.get(f"/v1/responses/{ids[0]}")).json()
    assert missing == {
        "error": {
            "message": f"Response with id '{ids[0]}' not found.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert (await http.get(f"/v1/responses/{ids[2]}/input_items?limit=0")).status_code == 400
    assert upstream.requests[-1].api == "openai.responses.input_items"
    upstream.reset()
    assert (await http.get(f"/v1/responses/{ids[2]}")).status_code == 404


# ---------------------------------------------------------------------------------------------------------------------
# running it


def test_thread_stop_closes_the_port() -> None:
    """FakeUpstreamThread serves sync clients while entered and frees its port on exit."""
    with FakeUpstreamThread(default_completion_tokens=2) as up:
        url = up.url
        r = httpx.post(url + "/v1/chat/completions", json=CHAT)
        assert r.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=5)


def test_url_before_start_is_an_error() -> None:
    """Reading url before start() says what to do instead of returning a wrong port."""
    with pytest.raises(RuntimeError, match="start"):
        _ = FakeUpstream().url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_serve_runs_until_ctrl_c_and_stops_cleanly(tmp_path: Path) -> None:
    """serve() answers requests and returns cleanly (exit 0, no traceback) on SIGINT."""
    port = _free_port()
    code = f"from tokenfuse.testing.fake_upstream import serve; serve(port={port}, latency=0.0)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert f"http://127.0.0.1:{port}" in line, line
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=10)
        assert r.json()["usage"]["prompt_tokens"] == CHAT_PROMPT_TOKENS
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


async def test_clients_that_leave_early_are_quiet_and_unreported(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that hang up before or during a stream get no usage recorded, and the server logs no error."""
    body = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    raw = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    for hang_up in ("half_close", "reset"):
        _, writer = await asyncio.open_connection("127.0.0.1", upstream.port)
        writer.write(raw)
        await writer.drain()
        if hang_up == "half_close":
            writer.write_eof()
        else:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        await asyncio.sleep(0.05)
        writer.close()
    upstream.chunk_delay = 0.02
    async with aiohttp.ClientSession() as s, s.post(upstream.url + "/v1/chat/completions", data=body) as r:
        assert (await r.content.readline()).startswith(b"data: ")
        # leaving the block drops the connection mid-stream
    await asyncio.sleep(0.5)  # longer than the rest of that stream would take
    # The raw-socket clients may hang up before the server even reads them; the mid-stream one is always seen.
    assert upstream.requests and upstream.requests[-1].status == 200 and upstream.requests[-1].usage is None
    # An SDK client some earlier test left to the garbage collector may fail its aclose() here ("Event loop is
    # closed"); that says nothing about this server, everything else does.
    errors = [
        rec
        for rec in caplog.records
        if rec.levelname == "ERROR" and "AsyncClient.aclose()" not in rec.getMessage() + str(rec.exc_info)
    ]
    assert not errors
