"""The fake OpenAI/Anthropic/Gemini-compatible upstream: an aiohttp server for tests, benchmarks and ``tokenfuse demo``.

It owns the wire shapes of every API tokenfuse meters, the deterministic usage it reports, the faults it can be
told to produce, and the record of every request it served; :class:`FakeUpstream` documents the rules.
"""

from __future__ import annotations

from tokenfuse.testing._fake.common import (
    FAULT_HEADER,
    FAULTS,
    LATENCY_HEADER,
    USAGE_HEADER,
    USAGE_KEYS,
    RecordedRequest,
    fake_completion_tokens,
    fake_prompt_tokens,
)
from tokenfuse.testing._fake.server import FakeUpstream, FakeUpstreamThread, make_app, serve

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
