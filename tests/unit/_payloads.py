"""Recorded provider payloads (tests/fixtures/provider-payloads) and the usage each one reports, for metering tests.

The expected usages are written out from the fixtures' README table, in genai-prices' conventions (input counts
cache reads and writes, output counts reasoning), so the tests check against the recorded numbers, not against
another implementation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tokenfuse.metering.types import Api, Usage

__all__ = [
    "EXPECTED",
    "FIXTURES_DIR",
    "GENAI_FLAVOR",
    "Fixture",
    "fixture",
    "fixture_names",
    "genai_counts",
    "json_fixtures",
    "sse_fixtures",
]

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures/provider-payloads"

_API: dict[str, Api] = {
    "chat.completions": "openai.chat",
    "responses": "openai.responses",
    "messages": "anthropic.messages",
    "generateContent": "google.generate_content",
}

GENAI_FLAVOR: dict[Api, tuple[str, str]] = {
    "openai.chat": ("openai", "chat"),
    "openai.completions": ("openai", "chat"),
    "openai.embeddings": ("openai", "embeddings"),
    "openai.responses": ("openai", "responses"),
    "anthropic.messages": ("anthropic", "default"),
    "google.generate_content": ("google", "default"),
}
"""genai-prices ``extract_usage(provider_id=…, api_flavor=…)`` for each API shape."""

EXPECTED: dict[str, Usage] = {
    # README: prompt 14 (cached 0), completion 30 (reasoning 0), total 44
    "openai-chat-nonstream-usage.json": Usage(14, 30, model="gpt-4o-2024-08-06"),
    # README: prompt 78 (cached 0), completion 9, total 87; usage only in the last chunk
    "openai-chat-stream-usage.json": Usage(78, 9, model="gpt-4o-mini-2024-07-18"),
    # README: prompt 577 (cached 0), completion 2320 incl. reasoning 1792
    "openai-chat-reasoning-o3-mini.json": Usage(577, 2320, output_reasoning_tokens=1792, model="o3-mini-2025-01-31"),
    # README: input 32 (cached 0), output 8 (reasoning 0)
    "openai-responses-nonstream-usage.json": Usage(32, 8, model="gpt-4o-2024-08-06"),
    # README: input 12594 incl. cached 3200, output 1150 incl. reasoning 1088
    "openai-responses-nonstream-cached-reasoning.json": Usage(
        12594, 1150, cache_read_tokens=3200, output_reasoning_tokens=1088, model="gpt-5-2025-08-07"
    ),
    # README: input 21 (cached 0), output 3 (reasoning 0)
    "openai-responses-stream-usage.json": Usage(21, 3, model="gpt-4.1-2025-04-14"),
    # README: input 63 (cached 0), output 151 incl. reasoning 128
    "openai-responses-stream-reasoning.json": Usage(63, 151, output_reasoning_tokens=128, model="gpt-5-2025-08-07"),
    # README: input 3, cache_read 1111, cache_creation 0, output 406 -> all input = 3 + 1111
    "anthropic-messages-cache-read.json": Usage(1114, 406, cache_read_tokens=1111, model="claude-sonnet-4-5-20250929"),
    # README: input 3, cache_read 1111, cache_creation 418 (ephemeral_5m 418), output 33 -> all input = 1532
    "anthropic-messages-cache-write-and-read.json": Usage(
        1532,
        33,
        cache_read_tokens=1111,
        cache_write_tokens=418,
        details={"cache_write_5m_tokens": 418},
        model="claude-sonnet-4-5-20250929",
    ),
    # README: message_start input 43 / output 1; message_delta input 43, output 277 (cumulative, final)
    "anthropic-messages-stream-thinking.json": Usage(43, 277, model="claude-sonnet-4-20250514"),
    # README: iterations = [compaction: in 100, cache_read 55096, out 83; message: in 181, out 8] -> billed as the
    # sum over iterations: input 100 + 55096 + 181 = 55377 (cache read 55096), output 83 + 8 = 91
    "anthropic-messages-stream-cache-compaction.json": Usage(
        55377, 91, cache_read_tokens=55096, model="claude-sonnet-4-6"
    ),
    # README: promptTokenCount 17713 (TEXT 16, VIDEO 15780, AUDIO 1917), candidates 100, thoughts 1176
    "google-generatecontent-thinking-video.json": Usage(
        17713,
        1276,
        output_reasoning_tokens=1176,
        details={"input_text_tokens": 16, "input_video_tokens": 15780, "input_audio_tokens": 1917},
        model="gemini-2.5-flash",
    ),
    # README: promptTokenCount 4606 (VIDEO 3096, TEXT 10, AUDIO 1500), candidatesTokenCount 386 (TEXT 386)
    "google-generatecontent-gemini-2.0-video.json": Usage(
        4606,
        386,
        details={
            "input_video_tokens": 3096,
            "input_text_tokens": 10,
            "input_audio_tokens": 1500,
            "output_text_tokens": 386,
        },
        model="gemini-2.0-flash",
    ),
    # README: last chunk promptTokenCount 18, candidatesTokenCount 80, thoughtsTokenCount 35 (running totals)
    "google-streamgeneratecontent-usage.json": Usage(
        18, 115, output_reasoning_tokens=35, details={"input_text_tokens": 18}, model="gemini-2.5-flash"
    ),
}


@dataclass(frozen=True)
class Fixture:
    """One recorded call."""

    name: str
    api: Api
    provider: str
    stream: bool
    request_path: str
    request_body: dict[str, Any]
    response_body: Any
    response_sse: str | None
    provider_usage: dict[str, Any]
    note: str

    @property
    def sse_bytes(self) -> bytes:
        assert self.response_sse is not None
        return self.response_sse.encode("utf-8")

    @property
    def body_bytes(self) -> bytes:
        return json.dumps(self.response_body).encode("utf-8")


def _require_dir() -> Path:
    if not FIXTURES_DIR.is_dir():
        raise RuntimeError(
            f"provider payload fixtures not found at {FIXTURES_DIR}: they ship in the repository "
            "(tests/fixtures/provider-payloads)"
        )
    return FIXTURES_DIR


@cache
def fixture_names() -> tuple[str, ...]:
    """Every fixture file name; fails loudly when the fixture folder is missing or empty."""
    names = tuple(sorted(p.name for p in _require_dir().glob("*.json")))
    if not names:
        raise RuntimeError(f"no *.json fixtures in {FIXTURES_DIR}")
    return names


@cache
def fixture(name: str) -> Fixture:
    """Load one fixture by file name."""
    d = json.loads((_require_dir() / name).read_text(encoding="utf-8"))
    return Fixture(
        name=name,
        api=_API[d["api"]],
        provider=d["provider"],
        stream=bool(d["stream"]),
        request_path=d["request_path"],
        request_body=d["request_body"],
        response_body=d.get("response_body"),
        response_sse=d.get("response_sse"),
        provider_usage=d["provider_usage"],
        note=d.get("note", ""),
    )


def json_fixtures() -> list[str]:
    """Names of the non-streamed fixtures."""
    return [n for n in fixture_names() if not fixture(n).stream]


def sse_fixtures() -> list[str]:
    """Names of the streamed (SSE) fixtures."""
    return [n for n in fixture_names() if fixture(n).stream]


def genai_counts(api: Api, response: Any) -> dict[str, int]:
    """What genai-prices' own ``extract_usage`` reads from ``response``: non-zero counts by usage key."""
    import genai_prices

    provider, flavor = GENAI_FLAVOR[api]
    extracted = genai_prices.extract_usage(response, provider_id=provider, api_flavor=flavor)
    return {k: int(v) for k, v in extracted.usage._reported_values().items() if v}
