"""Exact numbers at the edges, through the instrumented client: cut streams, missing, negative and absurd usage,
compressed bodies. What the provider did not say is estimated from everything seen, and flagged."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import zstandard
from prometheus_client import CollectorRegistry
from tests.sse import anthropic_events

import tokenfuse
from tokenfuse.config import parse_config
from tokenfuse.exporter.meter import Meter
from tokenfuse.metering.estimate import count_tokens

ANTHROPIC = "https://api.anthropic.com/v1/messages"
OPENAI = "https://api.openai.com/v1/chat/completions"
WORDS = [f"word{i} " for i in range(300)]


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(
        s.value
        for fam in reg.collect()
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


class _Cut(httpx.SyncByteStream):
    """A body that yields its chunks, then fails as a dropped connection does."""

    def __init__(self, chunks: list[bytes], cut: bool) -> None:
        self.chunks = chunks
        self.cut = cut

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.cut:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def _client(reg: CollectorRegistry, handler: object) -> httpx.Client:
    meter = Meter(parse_config({}), reg)
    inner = httpx.MockTransport(handler)  # type: ignore[arg-type]
    return httpx.Client(transport=tokenfuse.MeteredTransport(inner, meter=meter, department="marketing"))


def _post(client: httpx.Client, url: str, body: dict[str, object], stream: bool = False) -> bytes:
    with client.stream("POST", url, json=body) as r:
        return b"".join(r.iter_bytes())


BODY = {"model": "claude-sonnet-4-5", "max_tokens": 1000, "stream": True,
        "messages": [{"role": "user", "content": "Write three hundred words."}]}  # fmt: skip


def test_cut_anthropic_stream_bills_the_text_seen() -> None:
    """message_start (output 1), 300 text deltas, then the connection drops: output >= 90% of the tiktoken count of
    the text streamed, counted as estimated."""
    reg = CollectorRegistry()
    events = anthropic_events(WORDS, final=False)

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Cut(events, cut=True))

    with pytest.raises(httpx.RemoteProtocolError):
        _post(_client(reg, handler), ANTHROPIC, BODY)
    out = _value(reg, "tokenfuse_tokens_total", token_type="output")
    assert out >= 0.9 * count_tokens("".join(WORDS), "claude-sonnet-4-5")
    assert _value(reg, "tokenfuse_tokens_total", token_type="input") >= 25
    assert _value(reg, "tokenfuse_estimated_requests_total") == 1


def test_app_closing_a_stream_early_bills_what_it_read() -> None:
    """An app that stops reading after 100 deltas: billed at least the text it received, flagged estimated."""
    reg = CollectorRegistry()
    events = anthropic_events(WORDS, final=True)

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Cut(events, cut=False))

    client = _client(reg, handler)
    seen = 0
    with client.stream("POST", ANTHROPIC, json=BODY) as r:
        for _ in r.iter_raw():
            seen += 1
            if seen == 101:
                break
    out = _value(reg, "tokenfuse_tokens_total", token_type="output")
    assert out >= 0.9 * count_tokens("".join(WORDS[:100]), "claude-sonnet-4-5")
    assert _value(reg, "tokenfuse_estimated_requests_total") == 1


def test_complete_anthropic_stream_bills_the_reported_usage() -> None:
    """The same stream with its message_delta: exactly the reported counts, not estimated."""
    reg = CollectorRegistry()
    events = anthropic_events(WORDS, final=True)

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Cut(events, cut=False))

    _post(_client(reg, handler), ANTHROPIC, BODY)
    assert _value(reg, "tokenfuse_tokens_total", token_type="output") == 600
    assert _value(reg, "tokenfuse_tokens_total", token_type="input") == 25
    assert _value(reg, "tokenfuse_estimated_requests_total") == 0


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say something."}]}
ANSWER = "The quick brown fox jumps over the lazy dog, " * 20


def _chat_body(usage: object) -> bytes:
    body: dict[str, object] = {"id": "c", "object": "chat.completion", "model": "gpt-4o",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}}]}  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "usage",
    [None, {"prompt_tokens": -5, "completion_tokens": 3}, {"prompt_tokens": 2**53 - 1, "completion_tokens": 3}],
    ids=["missing", "negative", "absurd"],
)
def test_untrustworthy_usage_is_estimated_from_the_answer(usage: object) -> None:
    """No usage, a negative count or 2^53 tokens: estimated from prompt and answer text, flagged; never billed as
    given (2^53 would cost billions) nor as 0."""
    reg = CollectorRegistry()

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, content=_chat_body(usage))

    _post(_client(reg, handler), OPENAI, CHAT)
    out = _value(reg, "tokenfuse_tokens_total", token_type="output")
    assert out == pytest.approx(count_tokens(ANSWER, "gpt-4o"), abs=2)
    assert 0 < _value(reg, "tokenfuse_tokens_total", token_type="input") < 100
    assert _value(reg, "tokenfuse_estimated_requests_total") == 1
    assert _value(reg, "tokenfuse_cost_usd_total") < 0.01


def test_zstd_body_is_metered_exactly() -> None:
    """A zstd-encoded answer (httpx asks for zstd once zstandard is installed) is decoded for metering."""
    reg = CollectorRegistry()
    usage = {"prompt_tokens": 123, "completion_tokens": 45}
    packed = zstandard.ZstdCompressor().compress(_chat_body(usage))

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json", "content-encoding": "zstd"},
                              stream=_Cut([packed[:10], packed[10:]], cut=False))  # fmt: skip

    data = _post(_client(reg, handler), OPENAI, CHAT)
    assert json.loads(data)["usage"] == usage  # the app still gets its decoded answer
    assert _value(reg, "tokenfuse_tokens_total", token_type="input") == 123
    assert _value(reg, "tokenfuse_tokens_total", token_type="output") == 45
    assert _value(reg, "tokenfuse_estimated_requests_total") == 0


def test_brotli_body_is_metered_exactly() -> None:
    """br, where the brotli package is present, is decoded the same way."""
    import brotli

    reg = CollectorRegistry()
    usage = {"prompt_tokens": 7, "completion_tokens": 8}
    packed = brotli.compress(_chat_body(usage))

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json", "content-encoding": "br"},
                              stream=_Cut([packed], cut=False))  # fmt: skip

    _post(_client(reg, handler), OPENAI, CHAT)
    assert _value(reg, "tokenfuse_tokens_total", token_type="output") == 8
