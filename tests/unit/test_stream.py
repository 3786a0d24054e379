"""Usage and generated text from SSE streams, fed in any chunking."""

from __future__ import annotations

import json

import pytest
from _payloads import EXPECTED, fixture, genai_counts, sse_fixtures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenfuse.metering.stream import MAX_EVENT_BYTES, MAX_TEXT_BYTES, StreamUsageParser
from tokenfuse.metering.types import Api, Usage


class CountingParser(StreamUsageParser):
    """The parser with a count of the data events it dispatched ([DONE] included): kept in the tests, off the
    parser's own hot path, to check that every way of splitting a stream finds the same events."""

    __slots__ = ("events",)

    def __init__(self, api: Api) -> None:
        super().__init__(api)
        self.events = 0

    def _on_data(self, data: bytes) -> None:
        self.events += 1
        super()._on_data(data)


def _parse(api: Api, chunks: list[bytes]) -> CountingParser:
    p = CountingParser(api)
    for c in chunks:
        p.feed(c)
    return p


def _split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(raw)})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


@pytest.mark.parametrize("name", sse_fixtures())
def test_fixture_stream_usage_is_the_recorded_usage(name: str) -> None:
    """Every SSE fixture fed whole yields exactly the usage its README line reports."""
    fx = fixture(name)
    assert _parse(fx.api, [fx.sse_bytes]).result() == EXPECTED[name]


@pytest.mark.parametrize("name", sse_fixtures())
def test_fixture_stream_fed_byte_by_byte(name: str) -> None:
    """Feeding one byte at a time (every line, UTF-8 sequence and CRLF split) gives the same usage and text."""
    fx = fixture(name)
    raw = fx.sse_bytes
    whole = _parse(fx.api, [raw])
    single = _parse(fx.api, [raw[i : i + 1] for i in range(len(raw))])
    assert single.result() == whole.result()
    assert single.output_text == whole.output_text
    assert single.events == whole.events


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("name", sse_fixtures())
def test_fixture_stream_split_anywhere(name: str, data: st.DataObject) -> None:
    """Splitting a fixture stream at random points changes neither the usage, nor the text, nor the event count."""
    fx = fixture(name)
    raw = fx.sse_bytes
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(raw) - 1), max_size=40))
    whole = _parse(fx.api, [raw])
    split = _parse(fx.api, _split(raw, cuts))
    assert split.result() == whole.result() == EXPECTED[name]
    assert split.output_text == whole.output_text
    assert split.events == whole.events


def _data_objects(raw: str) -> list[dict[str, object]]:
    out = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload != "[DONE]":
                out.append(json.loads(payload))
    return out


@pytest.mark.parametrize(
    "name",
    [
        "openai-chat-stream-usage.json",
        "openai-responses-stream-usage.json",
        "openai-responses-stream-reasoning.json",
        "google-streamgeneratecontent-usage.json",
    ],
)
def test_stream_usage_equals_genai_prices_on_the_usage_event(name: str) -> None:
    """The stream's usage equals genai-prices' reading of the event that carries the final usage."""
    fx = fixture(name)
    objs = _data_objects(fx.response_sse or "")
    if fx.api == "openai.responses":
        last = next(o["response"] for o in reversed(objs) if o.get("type") == "response.completed")
    elif fx.api == "google.generate_content":
        last = objs[-1]
    else:
        last = next(o for o in reversed(objs) if isinstance(o.get("usage"), dict))
    usage = _parse(fx.api, [fx.sse_bytes]).result()
    assert usage is not None
    assert usage.counts() == genai_counts(fx.api, last)


def test_anthropic_stream_equals_genai_prices_on_merged_usage() -> None:
    """Anthropic start + cumulative delta usage equals genai-prices' reading of the merged usage object."""
    fx = fixture("anthropic-messages-stream-thinking.json")
    merged = {**fx.provider_usage["message_start"], **fx.provider_usage["message_delta"]}
    usage = _parse(fx.api, [fx.sse_bytes]).result()
    assert usage is not None
    assert usage.counts() == genai_counts(fx.api, {"usage": merged, "model": "claude-sonnet-4-20250514"})


def test_compaction_stream_bills_the_sum_over_iterations() -> None:
    """The compaction fixture bills the sum over usage.iterations, as its README line gives them, not the top level."""
    fx = fixture("anthropic-messages-stream-cache-compaction.json")
    iterations = fx.provider_usage["message_delta"]["iterations"]
    assert [(i["input_tokens"], i["cache_read_input_tokens"], i["output_tokens"]) for i in iterations] == [
        (100, 55096, 83),
        (181, 0, 8),
    ]
    usage = _parse(fx.api, [fx.sse_bytes]).result()
    assert usage == Usage(100 + 55096 + 181, 83 + 8, cache_read_tokens=55096, model="claude-sonnet-4-6")


def test_gemini_running_totals_are_not_summed() -> None:
    """Gemini's chunks each carry running totals: the last one is the usage (80 candidates), not their sum."""
    fx = fixture("google-streamgeneratecontent-usage.json")
    usage = _parse(fx.api, [fx.sse_bytes]).result()
    assert usage is not None
    assert usage.output_tokens == 80 + 35


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("openai-chat-stream-usage.json", "The capital of the UK is London."),
        ("openai-responses-stream-usage.json", "streamed"),
        ("openai-responses-stream-reasoning.json", "SELECT * FROM users LIMIT 5;"),
        ("anthropic-messages-stream-cache-compaction.json", "Hello! 👋"),
        ("google-streamgeneratecontent-usage.json", "\n".join(str(i) for i in range(1, 31))),
    ],
)
def test_output_text(name: str, text: str) -> None:
    """The generated text (answers, tool input) is collected from the deltas, unescaped, emoji intact."""
    fx = fixture(name)
    assert _parse(fx.api, [fx.sse_bytes]).output_text.endswith(text)


def test_anthropic_thinking_counts_as_output_text() -> None:
    """Anthropic thinking deltas are part of the output text (thinking is billed as output)."""
    fx = fixture("anthropic-messages-stream-thinking.json")
    text = _parse(fx.api, [fx.sse_bytes]).output_text
    assert text.startswith("This is a straightforward question about pedestrian safety.")
    assert "Eu4CCkYI" not in text  # the signature is not text


def test_event_counts() -> None:
    """events counts data events, [DONE] included, and not comments or event-only blocks."""
    raw = b": keep-alive\n\nevent: ping\n\ndata: {}\n\ndata: [DONE]\n\n"
    assert _parse("openai.chat", [raw]).events == 2
    assert _parse("openai.chat", [fixture("openai-chat-stream-usage.json").sse_bytes]).events == 12


def test_chat_stream_without_usage_gives_none_and_text() -> None:
    """A chat stream without include_usage reports no usage but keeps the text for estimation."""
    raw = b"".join(
        b'data: {"choices":[{"delta":{"content":"' + w + b'"}}],"usage":null}\n\n' for w in (b"Hi", b" there")
    )
    p = _parse("openai.chat", [raw + b"data: [DONE]\n\n"])
    assert p.result() is None
    assert p.output_text == "Hi there"


def test_cut_stream_reports_usage_so_far() -> None:
    """A stream cut before its end reports the usage seen so far: Anthropic's message_start, Gemini's last chunk."""
    fx = fixture("anthropic-messages-stream-thinking.json")
    raw = fx.sse_bytes
    cut = raw[: raw.index(b"event: message_delta")]
    assert _parse(fx.api, [cut]).result() == Usage(43, 1, model="claude-sonnet-4-20250514")
    g = fixture("google-streamgeneratecontent-usage.json")
    two = b"\r\n\r\n".join(g.sse_bytes.split(b"\r\n\r\n")[:2]) + b"\r\n\r\n"
    usage = _parse(g.api, [two]).result()
    assert usage is not None
    assert usage.output_tokens == 79 + 35


def test_last_event_without_blank_line_is_read() -> None:
    """A final event not terminated by a blank line (cut or sloppy server) still gives its usage."""
    raw = b'data: {"model":"m","usage":{"prompt_tokens":4,"completion_tokens":2}}'
    assert _parse("openai.chat", [raw]).result() == Usage(4, 2, model="m")
    truncated = b'data: {"model":"m","usage":{"prompt_tokens":4,"comp'
    assert _parse("openai.chat", [truncated]).result() is None


def test_result_can_be_asked_mid_stream() -> None:
    """Asking for the result mid-stream does not disturb what the rest of the stream gives."""
    fx = fixture("anthropic-messages-stream-cache-compaction.json")
    raw = fx.sse_bytes
    p = StreamUsageParser(fx.api)
    half = raw.index(b'"type":"message_delta"') + 40
    p.feed(raw[:half])
    p.result()
    p.feed(raw[half:])
    assert p.result() == EXPECTED[fx.name]


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
def test_line_endings(sep: bytes) -> None:
    """LF, CRLF and lone CR line endings all parse (SSE allows the three)."""
    lines = [
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}',
        b"",
        b'data: {"choices":[],"model":"m","usage":{"prompt_tokens":1,"completion_tokens":1}}',
        b"",
    ]
    raw = sep.join(lines) + sep
    p = _parse("openai.chat", [raw[i : i + 3] for i in range(0, len(raw), 3)])
    assert p.result() == Usage(1, 1, model="m")
    assert p.output_text == "a"


def test_multi_line_data_event() -> None:
    """An event whose JSON is spread over several data: lines is joined before reading."""
    raw = b'event: response.completed\ndata: {"type":"response.completed",\ndata: "response":{"model":"m",'
    raw += b'"usage":{"input_tokens":2,"output_tokens":3}}}\n\n'
    assert _parse("openai.responses", [raw]).result() == Usage(2, 3, model="m")


def test_responses_incomplete_and_failed_events_carry_usage() -> None:
    """Responses' response.incomplete and response.failed events are read like response.completed."""
    for typ in (b"response.incomplete", b"response.failed"):
        raw = b'data: {"type":"' + typ + b'","response":{"model":"m","usage":{"input_tokens":5,"output_tokens":1}}}'
        assert _parse("openai.responses", [raw + b"\n\n"]).result() == Usage(5, 1, model="m")


def test_garbled_last_usage_event_falls_back_to_previous() -> None:
    """If the last usage-looking event is not JSON, the previous usage event still counts."""
    raw = (
        b'data: {"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4}}\r\n\r\n'
        b'data: {"usageMetadata": broken\r\n\r\n'
    )
    assert _parse("google.generate_content", [raw]).result() == Usage(3, 4)


def test_output_text_is_bounded_and_counted() -> None:
    """Text beyond MAX_TEXT_BYTES is not kept but is counted in output_chars, so estimates can scale."""
    word = b"abcdefghij" * 10
    event = b'data: {"choices":[{"delta":{"content":"' + word + b'"}}],"usage":null}\n\n'
    n = MAX_TEXT_BYTES // len(word) + 50
    p = StreamUsageParser("openai.chat")
    for _ in range(n):
        p.feed(event)
    assert len(p.output_text) <= MAX_TEXT_BYTES
    assert p.output_chars == n * len(word)


def test_oversized_event_is_skipped_and_parsing_resumes() -> None:
    """An event larger than MAX_EVENT_BYTES is dropped whole; the events after it are still read."""
    p = StreamUsageParser("openai.chat")
    p.feed(b'data: {"choices":[{"delta":{"content":"')
    block = b"x" * (1024 * 1024)
    for _ in range(MAX_EVENT_BYTES // len(block) + 2):
        p.feed(block)
    p.feed(b'"}}]}\n\ndata: {"model":"m","usage":{"prompt_tokens":7,"completion_tokens":1}}\n\n')
    assert p.result() == Usage(7, 1, model="m")


def test_non_bytes_chunks_are_accepted() -> None:
    """bytearray and memoryview chunks are read like bytes; empty chunks are ignored."""
    raw = b'data: {"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    p = StreamUsageParser("openai.chat")
    p.feed(b"")
    p.feed(bytearray(raw[:10]))
    p.feed(memoryview(raw[10:]))
    assert p.result() == Usage(1, 2, model="m")


def test_embeddings_stream_api_has_no_text() -> None:
    """For an API without text deltas the parser still counts events and reports no text."""
    p = _parse("openai.embeddings", [b'data: {"text":"x"}\n\n'])
    assert p.events == 1
    assert p.output_text == ""


def test_events_with_type_not_first_are_still_read() -> None:
    """Anthropic and Responses events whose "type" is not the first key (or spaced) are recognised all the same."""
    anthropic = (
        b'event: message_start\ndata: { "message": {"model": "m", "usage": {"input_tokens": 9, "output_tokens": 1}},'
        b' "type": "message_start"}\n\n'
        b'event: content_block_delta\ndata: {"index":0,"delta":{"type":"text_delta","text":"Hi"},'
        b'"type":"content_block_delta"}\n\n'
        b'event: message_delta\ndata: {"usage":{"output_tokens":5},"type":"message_delta"}\n\n'
    )
    p = _parse("anthropic.messages", [anthropic])
    assert p.result() == Usage(9, 5, model="m")
    assert p.output_text == "Hi"
    responses = (
        b'data: {"delta":"Hel","type":"response.output_text.delta"}\n\n'
        b'data: {"delta":"QUFBQQ==","type":"response.audio.delta"}\n\n'
        b'data: {"response":{"model":"m","usage":{"input_tokens":2,"output_tokens":1}},"type":"response.completed"}\n\n'
    )
    q = _parse("openai.responses", [responses])
    assert q.result() == Usage(2, 1, model="m")
    assert q.output_text == "Hel"
