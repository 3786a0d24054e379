"""Helpers for testing code that talks to LLM APIs: a fake OpenAI/Anthropic/Gemini-compatible upstream.

Used by tokenfuse's own tests, its benchmarks and ``tokenfuse demo``; reusable in yours.
"""

from __future__ import annotations

from tokenfuse.testing.fake_upstream import (
    FAULT_HEADER,
    FAULTS,
    LATENCY_HEADER,
    USAGE_HEADER,
    USAGE_KEYS,
    FakeUpstream,
    FakeUpstreamThread,
    RecordedRequest,
    fake_completion_tokens,
    fake_prompt_tokens,
    make_app,
    serve,
)

__all__ = [
    "FAULTS",
    "FAULT_HEADER",
    "LATENCY_HEADER",
    "USAGE_HEADER",
    "USAGE_KEYS",
    "FakeUpstream",
    "FakeUpstreamThread",
    "RecordedRequest",
    "fake_completion_tokens",
    "fake_prompt_tokens",
    "make_app",
    "serve",
]
