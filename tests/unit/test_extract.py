"""Usage extraction from non-streamed responses, and the request facts (API, provider, model, stream)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from _payloads import EXPECTED, fixture, genai_counts, json_fixtures

from tokenfuse.metering.extract import (
    MAX_COUNT,
    detect_api,
    extract_usage,
    infer_provider,
    request_model,
    usage_from_root,
    wants_stream,
)
from tokenfuse.metering.types import Api, Usage

# --- recorded fixtures -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", json_fixtures())
def test_fixture_usage_is_the_recorded_usage(name: str) -> None:
    """Every non-streamed fixture yields exactly the usage its README line reports (cached and reasoning included)."""
    fx = fixture(name)
    assert extract_usage(fx.api, fx.body_bytes) == EXPECTED[name]


@pytest.mark.parametrize("name", json_fixtures())
def test_fixture_usage_equals_genai_prices(name: str) -> None:
    """On every non-streamed fixture the fast extractor reads the same counts as genai-prices' extract_usage."""
    fx = fixture(name)
    usage = extract_usage(fx.api, fx.body_bytes)
    assert usage is not None
    assert usage.counts() == genai_counts(fx.api, fx.response_body)


@pytest.mark.parametrize("name", json_fixtures())
def test_bytes_text_and_mapping_bodies_agree(name: str) -> None:
    """A body given as bytes, as text, or already decoded gives the same usage."""
    fx = fixture(name)
    as_bytes = extract_usage(fx.api, fx.body_bytes)
    assert extract_usage(fx.api, fx.body_bytes.decode()) == as_bytes
    assert extract_usage(fx.api, fx.response_body) == as_bytes
    assert extract_usage(fx.api, bytearray(fx.body_bytes)) == as_bytes


def _reordered(body: dict[str, Any], first: tuple[str, ...], last: tuple[str, ...]) -> dict[str, Any]:
    out = {k: body[k] for k in first if k in body}
    out.update({k: v for k, v in body.items() if k not in first and k not in last})
    out.update({k: body[k] for k in last if k in body})
    return out


@pytest.mark.parametrize("name", json_fixtures())
@pytest.mark.parametrize("indent", [None, 2])
def test_scan_finds_usage_in_provider_key_order(name: str, indent: int | None) -> None:
    """In the providers' own key order (Gemini's modelVersion after usage), compact or indented, the scan finds usage."""
    fx = fixture(name)
    body = fx.response_body
    if fx.api == "google.generate_content":
        ordered = _reordered(body, (), ("usageMetadata", "modelVersion", "responseId"))
    else:
        ordered = _reordered(body, ("id", "object", "type", "role", "created", "model"), ("usage",))
    raw = json.dumps(ordered, indent=indent, ensure_ascii=False).encode()
    assert extract_usage(fx.api, raw) == EXPECTED[name]


# --- hand-written payloads in recorded shapes ----------------------------------------------------------------------

CHAT_CACHED = {
    "id": "chatcmpl-AJ7wr2Ld2X0d3m3n",
    "object": "chat.completion",
    "created": 1729245025,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Sure.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "system_fingerprint": "fp_6b68a8204b",
}

CHAT_AUDIO = {
    "id": "chatcmpl-audio",
    "object": "chat.completion",
    "created": 1729245025,
    "model": "gpt-4o-audio-preview-2024-10-01",
    "choices": [],
    "usage": {
        "prompt_tokens": 120,
        "completion_tokens": 240,
        "total_tokens": 360,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 100, "text_tokens": 20},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 200, "text_tokens": 40},
    },
}

EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, -0.0028842222]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}

LEGACY_COMPLETION = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

GEMINI_CACHED = {
    "candidates": [{"content": {"parts": [{"text": "Summary."}], "role": "model"}, "finishReason": "STOP"}],
    "usageMetadata": {
        "promptTokenCount": 2150,
        "candidatesTokenCount": 120,
        "totalTokenCount": 2370,
        "cachedContentTokenCount": 2048,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2150}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 2048}],
        "thoughtsTokenCount": 100,
    },
    "modelVersion": "gemini-2.5-flash",
    "responseId": "abc",
}

GEMINI_TOOL_USE = {
    "candidates": [],
    "usageMetadata": {
        "promptTokenCount": 40,
        "candidatesTokenCount": 10,
        "toolUsePromptTokenCount": 300,
        "toolUsePromptTokensDetails": [{"modality": "TEXT", "tokenCount": 300}],
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 30}, {"modality": "DOCUMENT", "tokenCount": 10}],
        "totalTokenCount": 350,
    },
    "modelVersion": "gemini-2.5-pro",
}

ANTHROPIC_1H_WRITE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 10,
        "cache_creation_input_tokens": 2000,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 500, "ephemeral_1h_input_tokens": 1500},
        "output_tokens": 50,
        "server_tool_use": {"web_search_requests": 2},
        "service_tier": "standard",
    },
}

HAND_WRITTEN: list[tuple[str, Api, dict[str, Any], Usage]] = [
    (
        "chat-cached",
        "openai.chat",
        CHAT_CACHED,
        Usage(2006, 300, cache_read_tokens=1920, model="gpt-4o-2024-08-06"),
    ),
    (
        "chat-audio",
        "openai.chat",
        CHAT_AUDIO,
        Usage(
            120,
            240,
            details={"input_audio_tokens": 100, "output_audio_tokens": 200},
            model="gpt-4o-audio-preview-2024-10-01",
        ),
    ),
    ("embeddings", "openai.embeddings", EMBEDDINGS, Usage(8, 0, model="text-embedding-3-small")),
    ("legacy-completion", "openai.completions", LEGACY_COMPLETION, Usage(5, 7, model="gpt-3.5-turbo-instruct")),
    (
        "gemini-cached",
        "google.generate_content",
        GEMINI_CACHED,
        Usage(
            2150,
            220,
            cache_read_tokens=2048,
            output_reasoning_tokens=100,
            details={"input_text_tokens": 2150, "cache_text_read_tokens": 2048},
            model="gemini-2.5-flash",
        ),
    ),
    (
        "gemini-tool-use",
        "google.generate_content",
        GEMINI_TOOL_USE,
        Usage(
            340,
            10,
            details={
                "input_text_tokens": 330,
                "input_image_tokens": 10,
                "input_tool_tokens": 300,
                "input_text_tool_tokens": 300,
            },
            model="gemini-2.5-pro",
        ),
    ),
    (
        "anthropic-1h-write",
        "anthropic.messages",
        ANTHROPIC_1H_WRITE,
        Usage(
            2010,
            50,
            cache_write_tokens=2000,
            details={"cache_write_5m_tokens": 500, "cache_write_1h_tokens": 1500, "web_searches": 2},
            model="claude-sonnet-4-5-20250929",
        ),
    ),
]


@pytest.mark.parametrize(("label", "api", "body", "expected"), HAND_WRITTEN, ids=[h[0] for h in HAND_WRITTEN])
def test_hand_written_payloads(label: str, api: Api, body: dict[str, Any], expected: Usage) -> None:
    """Shapes the fixtures lack give the documented usage, equal to genai-prices' reading, from bytes and dicts."""
    assert extract_usage(api, json.dumps(body).encode()) == expected
    assert extract_usage(api, body) == expected
    assert expected.counts() == genai_counts(api, body)


def test_deepseek_cache_hit_field_counts_as_cache_read() -> None:
    """DeepSeek's prompt_cache_hit_tokens is read as cache_read when prompt_tokens_details is absent."""
    body = {
        "model": "deepseek-chat",
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "prompt_cache_hit_tokens": 64,
            "prompt_cache_miss_tokens": 36,
        },
    }
    assert extract_usage("openai.chat", body) == Usage(100, 5, cache_read_tokens=64, model="deepseek-chat")


def test_anthropic_iterations_are_summed_non_streamed() -> None:
    """A non-streamed Anthropic body with usage.iterations is billed as the sum of its iterations."""
    body = {
        "model": "claude-sonnet-4-6",
        "usage": {
            "input_tokens": 181,
            "output_tokens": 8,
            "cache_read_input_tokens": 0,
            "iterations": [
                {"input_tokens": 100, "output_tokens": 83, "cache_read_input_tokens": 55096, "type": "compaction"},
                {"input_tokens": 181, "output_tokens": 8, "type": "message"},
            ],
        },
    }
    assert extract_usage("anthropic.messages", body) == Usage(
        55377, 91, cache_read_tokens=55096, model="claude-sonnet-4-6"
    )


def test_anthropic_iterations_without_counts_fall_back_to_top_level() -> None:
    """An iterations list with nothing usable does not hide the top-level counts."""
    body = {"usage": {"input_tokens": 5, "output_tokens": 6, "iterations": [{"type": "message"}, "x", None]}}
    assert extract_usage("anthropic.messages", body) == Usage(5, 6)


def test_gemini_json_array_stream_takes_last_chunk() -> None:
    """Gemini's non-SSE streamGenerateContent (a JSON array of running totals) gives the last chunk's usage."""
    chunks = [
        {"usageMetadata": {"promptTokenCount": 18, "candidatesTokenCount": 31}, "modelVersion": "gemini-2.5-flash"},
        {"usageMetadata": {"promptTokenCount": 18, "candidatesTokenCount": 80}, "modelVersion": "gemini-2.5-flash"},
        {"candidates": []},
    ]
    assert extract_usage("google.generate_content", json.dumps(chunks).encode()) == Usage(
        18, 80, model="gemini-2.5-flash"
    )


def test_responses_event_wrapper_is_unwrapped() -> None:
    """A Responses ``response.completed`` event object gives its response's usage and model."""
    event = {
        "type": "response.completed",
        "response": {"model": "gpt-4.1", "usage": {"input_tokens": 3, "output_tokens": 4}},
    }
    assert extract_usage("openai.responses", json.dumps(event)) == Usage(3, 4, model="gpt-4.1")


def test_nested_usage_key_is_not_mistaken_for_the_top_level_one() -> None:
    """A "usage" object inside tool input (after the real one) does not replace the top-level usage."""
    body = (
        b'{"model":"claude-sonnet-4-5","usage":{"input_tokens":10,"output_tokens":2},'
        b'"content":[{"type":"tool_use","input":{"usage":{"input_tokens":999999,"output_tokens":999999}}}]}'
    )
    assert extract_usage("anthropic.messages", body) == Usage(10, 2, model="claude-sonnet-4-5")


def test_model_as_a_string_value_is_not_the_model_key() -> None:
    """A string value "model" (Gemini's role) is not taken for the model key."""
    body = (
        b'{"candidates":[{"content":{"role":"model","parts":[{"text":"x"}]}}],'
        b'"usageMetadata":{"promptTokenCount":1,"candidatesTokenCount":2},"modelVersion":"gemini-2.0-flash"}'
    )
    assert extract_usage("google.generate_content", body) == Usage(1, 2, model="gemini-2.0-flash")


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["14", 14.0, -1, float("nan"), float("inf"), True, None, [14], {"n": 14}, MAX_COUNT + 1, 10**40],
    ids=repr,
)
def test_wrong_typed_counts_are_missing(bad: object) -> None:
    """Strings, floats, NaN, bools, negatives, containers and absurd ints are never counted: one such main count
    makes the whole usage missing (the caller estimates it), not a 0; a null one is absent and reads as 0."""
    body = {"usage": {"prompt_tokens": bad, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": bad}}}
    assert extract_usage("openai.chat", body) == (Usage(0, 7) if bad is None else None)
    assert extract_usage("openai.chat", {"usage": {"prompt_tokens": bad, "completion_tokens": bad}}) is None
    for api, key in (("openai.responses", "input_tokens"), ("anthropic.messages", "input_tokens"),
                     ("google.generate_content", "promptTokenCount")):  # fmt: skip
        other = "candidatesTokenCount" if api.startswith("google") else "output_tokens"
        root = {"usageMetadata": {key: bad, other: 7}} if api.startswith("google") else {"usage": {key: bad, other: 7}}
        got = extract_usage(api, root)  # type: ignore[arg-type]
        assert (got is not None and got.output_tokens == 7) if bad is None else got is None, (api, got)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"usage": {"prompt_tokens": 5',
        b"[]",
        b"null",
        b'{"usage": null}',
        b'{"usage": "lots"}',
        b'{"usage": [1, 2]}',
        b'{"error": {"message": "rate limited"}}',
        b"\xff\xfe{garbage",
        '{"usage": {"prompt_tokens": \ud800}}',
    ],
    ids=repr,
)
def test_bodies_without_usage_give_none(body: bytes | str) -> None:
    """Non-JSON, truncated, error and wrong-shape bodies give None without raising."""
    assert extract_usage("openai.chat", body) is None


def test_usage_from_root_rejects_non_mappings() -> None:
    """usage_from_root answers None for roots that are not JSON objects."""
    assert usage_from_root("openai.chat", [1, 2]) is None
    assert usage_from_root("anthropic.messages", "x") is None
    assert usage_from_root("google.generate_content", 3) is None


# --- request facts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "openai.chat"),
        ("/openai/v1/chat/completions", "openai.chat"),
        ("/chat/completions", "openai.chat"),
        ("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21", "openai.chat"),
        ("/v1/responses", "openai.responses"),
        ("/v1/embeddings", "openai.embeddings"),
        ("/v1/completions", "openai.completions"),
        ("/v1/messages", "anthropic.messages"),
        ("/anthropic/v1/messages?beta=true", "anthropic.messages"),
        ("/v1beta/models/gemini-2.5-flash:generateContent", "google.generate_content"),
        ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "google.generate_content"),
        (
            "/v1/projects/p/locations/us/publishers/google/models/gemini-2.5-pro:generateContent",
            "google.generate_content",
        ),
        ("/v1/models", None),
        ("/v1/messages/count_tokens", None),
        ("/v1/responses/resp_123", None),
        ("/v1/chat/completions/abc", None),
        ("/", None),
    ],
)
def test_detect_api(path: str, api: Api | None) -> None:
    """Paths map to their API shape under any prefix, query strings ignored; other endpoints are not metered."""
    assert detect_api(path) == api


@pytest.mark.parametrize(
    ("host", "api", "provider"),
    [
        ("api.openai.com", "openai.chat", "openai"),
        ("api.anthropic.com", "anthropic.messages", "anthropic"),
        ("API.ANTHROPIC.COM:443", None, "anthropic"),
        ("generativelanguage.googleapis.com", "google.generate_content", "google"),
        ("api.deepseek.com", "openai.chat", "deepseek"),
        ("api.mistral.ai", "openai.chat", "mistral"),
        ("api.groq.com", "openai.chat", "groq"),
        ("openrouter.ai", "openai.chat", "openrouter"),
        ("my-resource.openai.azure.com", "openai.chat", "azure"),
        ("localhost:8080", "anthropic.messages", "anthropic"),
        ("127.0.0.1", "google.generate_content", "google"),
        ("127.0.0.1", "openai.responses", "openai"),
        (None, "openai.embeddings", "openai"),
        (None, None, "openai"),
    ],
)
def test_infer_provider(host: str | None, api: Api | None, provider: str) -> None:
    """Known hosts name their genai-prices provider; unknown hosts fall back to the API shape's provider."""
    assert infer_provider(host, api) == provider


def test_request_model() -> None:
    """The model comes from the body, or for Gemini from the path."""
    assert request_model("openai.chat", {"model": "gpt-4o"}) == "gpt-4o"
    assert request_model("openai.chat", {"model": 5}) is None
    assert request_model("openai.chat", {}) is None
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert request_model("google.generate_content", {}, path) == "gemini-2.5-flash"
    assert request_model("google.generate_content", {"model": "models/gemini-2.0-flash"}) == "gemini-2.0-flash"


def test_wants_stream() -> None:
    """Streaming is ``"stream": true`` in the body, or Gemini's streamGenerateContent path."""
    assert wants_stream("openai.chat", {"stream": True})
    assert not wants_stream("openai.chat", {"stream": "yes"})
    assert not wants_stream("anthropic.messages", {})
    assert wants_stream("google.generate_content", {}, "/v1beta/models/x:streamGenerateContent")
    assert not wants_stream("google.generate_content", {"stream": True}, "/v1beta/models/x:generateContent")
