"""Usage from a streamed (SSE) response, fed chunk by chunk as it passes through, in bounded memory.

Owns the per-provider stream rules: which event carries usage, which events carry generated text, and how partial
usages combine (OpenAI: last chunk; Responses: the final ``response.*`` event; Anthropic: start + cumulative deltas;
Gemini: running totals, take the last). Parses JSON only for the few events that carry usage.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from tokenfuse.metering.extract import extract_usage, usage_from_root
from tokenfuse.metering.types import Api, Usage

__all__ = ["StreamUsageParser"]

MAX_TEXT_BYTES: Final = 256 * 1024
"""Generated text kept for estimation; beyond it, text is only counted (`StreamUsageParser.output_chars`)."""

MAX_EVENT_BYTES: Final = 16 * 1024 * 1024
"""An SSE event larger than this is skipped rather than buffered (no provider sends usage in one)."""

_STR = rb'\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
_CHAT_CONTENT = re.compile(rb'"content":' + _STR)
_CHAT_TEXT = re.compile(rb'"(?:content|reasoning_content|reasoning|arguments|refusal)":' + _STR)
_TEXT = re.compile(rb'"text":' + _STR)
_DELTA = re.compile(rb'"delta":' + _STR)
_ANTHROPIC_TEXT = re.compile(rb'"(?:text|thinking|partial_json)":' + _STR)

_CHAT, _RESPONSES, _ANTHROPIC, _GOOGLE, _OTHER = range(5)
_KINDS = {
    "openai.chat": _CHAT,
    "openai.completions": _CHAT,
    "openai.embeddings": _OTHER,
    "openai.responses": _RESPONSES,
    "anthropic.messages": _ANTHROPIC,
    "google.generate_content": _GOOGLE,
}
_RESPONSE_DONE = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')
_RESPONSE_DONE_TYPES = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
_TYPE_PREFIX = b'{"type":"'
# Substring tests on bytes here use .find(), not ``in``: ``x in some_bytes`` first tries x as an integer and
# raises and clears a TypeError before searching (~300 ns a test, more than the search on a chunk).


def _event_type(data: bytes) -> bytes | None:
    """The event type when it is the first key, as OpenAI Responses and Anthropic send it; else None (search)."""
    if data.startswith(_TYPE_PREFIX):
        end = data.find(b'"', 9)
        if end > 0:
            return data[9:end]
    return None


def _decode_strings(parts: list[bytes]) -> str:
    """JSON string bodies (escapes intact) to text: one C-level decode for all, per part only if that fails."""
    if not parts:
        return ""
    try:
        return "".join(json.loads(b'["' + b'","'.join(parts) + b'"]'))
    except (ValueError, RecursionError):
        out = []
        for p in parts:
            try:
                out.append(json.loads(b'"' + p + b'"'))
            except (ValueError, RecursionError):
                out.append(p.decode("utf-8", "replace"))
        return "".join(out)


def _event_data(ev: bytes) -> bytes | None:
    """The data of one SSE event (its ``data:`` lines joined), or None if it has none."""
    i = ev.find(b"data:")
    if i < 0:
        return None
    if i == 0 or ev[i - 1] == 0x0A:
        rest = ev[i + 5 :]
        if rest.find(b"\n") < 0:
            return rest[1:] if rest[:1] == b" " else rest
    parts = []
    for line in ev.split(b"\n"):
        if line.startswith(b"data:"):
            v = line[5:]
            parts.append(v[1:] if v[:1] == b" " else v)
    return b"\n".join(parts) if parts else None


class StreamUsageParser:
    """Reads an SSE response as it streams and tells the usage at the end (or so far, if the stream was cut).

    Feed it the raw bytes in any chunking (split mid-line or mid-UTF-8 is fine); it never raises.

    Args:
        api: the API shape of the call.
    """

    __slots__ = (
        "_anthropic",
        "_anthropic_delta",
        "_anthropic_model",
        "_buf",
        "_cr",
        "_decoded",
        "_decoded_parts",
        "_kind",
        "_skipping",
        "_text",
        "_text_bytes",
        "_text_dropped",
        "_text_re",
        "_usage_raw",
        "api",
    )

    def __init__(self, api: Api) -> None:
        self.api: Api = api
        self._kind = _KINDS.get(api, _OTHER)
        self._text_re = {
            _CHAT: _CHAT_CONTENT,
            _RESPONSES: _DELTA,
            _ANTHROPIC: _ANTHROPIC_TEXT,
            _GOOGLE: _TEXT,
        }.get(self._kind)
        if api == "openai.completions":
            self._text_re = _TEXT
        self._buf = bytearray()
        self._cr = False
        self._skipping = False
        self._usage_raw: list[bytes] = []
        self._anthropic: dict[str, Any] | None = None
        self._anthropic_model: object = None
        self._anthropic_delta = False
        self._text: list[bytes] = []
        self._text_bytes = 0
        self._text_dropped = 0
        self._decoded = ""
        self._decoded_parts = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the response body.

        Args:
            chunk: any slice of the stream, in order.
        """
        # The hot path (one small event per chunk) is written out flat, in this one call: at ~400 bytes a chunk,
        # every extra function call or copy is a measurable share of the per-chunk budget.
        try:
            if not self._buf and type(chunk) is bytes and chunk[-1:] == b"\n" and not self._cr and not self._skipping:
                # Exactly one event per chunk, "data: {...}\n\n" (OpenAI, Gemini) or "event: x\ndata: {...}\n\n"
                # (Anthropic, Responses): the shape of nearly every token chunk, read without splitting.
                nl = chunk.find(b"\n")
                end = len(chunk) - 2
                if nl == end and chunk[:6] == b"data: " and chunk.find(b"\r") < 0:
                    self._on_data(chunk[6:-2])
                    return
                if (
                    chunk[:6] == b"event:"
                    and chunk[nl + 1 : nl + 7] == b"data: "
                    and chunk.find(b"\n", nl + 1) == end
                    and chunk.find(b"\r") < 0
                ):
                    self._on_data(chunk[nl + 7 : -2])
                    return
            self._feed(chunk)
        except Exception:  # metering must never break the stream it observes
            self._buf.clear()

    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        buf = self._buf
        if self._cr or chunk.find(b"\r") >= 0:
            chunk = self._normalize(chunk)
        if buf:
            search_from = len(buf) - 1
            buf += chunk
            idx = buf.rfind(b"\n\n", search_from)
            if idx < 0:
                if len(buf) > MAX_EVENT_BYTES:
                    buf.clear()
                    self._skipping = True
                return
            block = bytes(buf[:idx])
            del buf[: idx + 2]
        else:
            idx = chunk.rfind(b"\n\n")
            if idx < 0:
                buf += chunk
                return
            block = chunk[:idx]
            if idx + 2 < len(chunk):
                buf += chunk[idx + 2 :]
        if self._skipping:
            cut = block.find(b"\n\n")
            self._skipping = False
            if cut < 0:
                return
            block = block[cut + 2 :]
        on_data = self._on_data
        for ev in block.split(b"\n\n") if block.find(b"\n\n") >= 0 else (block,):
            if ev[:6] == b"data: " and ev.find(b"\n") < 0:
                on_data(ev[6:])
            elif ev:
                data = _event_data(ev)
                if data is not None:
                    on_data(data)

    def _normalize(self, chunk: bytes) -> bytes:
        """CRLF and CR line ends to LF (SSE allows all three; Gemini sends CRLF), holding back a trailing CR."""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def _on_data(self, data: bytes) -> None:
        kind = self._kind
        text_re = self._text_re
        pos = 0
        if kind == _CHAT:
            i = data.rfind(b'"usage":')
            if i >= 0 and data[i + 8 : i + 10].lstrip()[:1] == b"{":
                self._keep(data)
            # Generated text sits in choices[].delta, after the id/model preamble: search from there.
            pos = data.find(b'"choices"')
            if pos < 0:
                pos = 0
        elif kind == _GOOGLE:
            if data.find(b'"usageMetadata"') >= 0:
                self._keep(data)
        elif kind == _RESPONSES:
            typ = _event_type(data)
            if typ is None:
                if data.find(b'.delta"') < 0 or data.find(b'"response.audio.delta"') >= 0:
                    text_re = None
                if data.find(b'"response.') >= 0 and any(data.find(m) >= 0 for m in _RESPONSE_DONE):
                    self._keep(data)
            elif typ.endswith(b".delta") and typ != b"response.audio.delta":
                pos = max(data.find(b'"delta"'), 0)
            else:
                text_re = None
                if typ in _RESPONSE_DONE_TYPES:
                    self._keep(data)
        elif kind == _ANTHROPIC:
            typ = _event_type(data)
            if typ == b"content_block_delta" or (typ is None and data.find(b"content_block_delta") >= 0):
                pos = max(data.find(b'"delta"'), 0)
            else:
                text_re = None
                if typ in (b"message_start", b"message_delta") or (
                    typ is None and (data.find(b'"message_start"') >= 0 or data.find(b'"message_delta"') >= 0)
                ):
                    self._anthropic = self._anthropic_event(data, self._anthropic)
                    if typ == b"message_delta" or (typ is None and data.find(b'"message_delta"') >= 0):
                        self._anthropic_delta = True
        if text_re is not None:
            found = text_re.findall(data, pos)
            if kind == _CHAT and not (found and found[0]):
                # A literal-prefixed pattern is twice as fast; the alternation runs only for chunks without
                # answer text (role, tool-call arguments, reasoning_content, finish).
                found = _CHAT_TEXT.findall(data, pos)
            for m in found:
                if m:
                    n = len(m)
                    if self._text_bytes + n <= MAX_TEXT_BYTES:
                        self._text.append(m)
                        self._text_bytes += n
                    else:
                        self._text_dropped += n

    def _keep(self, data: bytes) -> None:
        # Keep only the raw bytes of the latest two usage events; decode lazily in result(). Two, so that one
        # garbled event at the end does not lose the usage of the one before.
        raw = self._usage_raw
        raw.append(data)
        if len(raw) > 2:
            del raw[0]

    def _anthropic_event(self, data: bytes, into: dict[str, Any] | None) -> dict[str, Any] | None:
        """``into`` with a message_start / message_delta event's usage merged in (a new dict; ``into`` is kept)."""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            return into
        if not isinstance(obj, dict):
            return into
        typ = obj.get("type")
        if typ == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                u = msg.get("usage")
                self._anthropic_model = msg.get("model")
                return dict(u) if isinstance(u, dict) else {}
        elif typ == "message_delta":
            u = obj.get("usage")
            if isinstance(u, dict):
                # message_delta counts are cumulative: a field it carries replaces message_start's.
                merged = dict(into or {})
                merged.update(u)
                return merged
        return into

    def _tail_data(self) -> bytes | None:
        """The data of a last event the stream did not terminate with a blank line (a cut or sloppy server)."""
        if not self._buf or self._skipping:
            return None
        return _event_data(bytes(self._buf).strip(b"\n"))

    def result(self) -> Usage | None:
        """The usage the stream reported, or None if it reported none (then estimate from `output_text`)."""
        try:
            tail = self._tail_data()
            if self._kind == _ANTHROPIC:
                merged = self._anthropic
                if tail is not None and (tail.find(b'"message_start"') >= 0 or tail.find(b'"message_delta"') >= 0):
                    merged = self._anthropic_event(tail, merged)
                if merged is None:
                    return None
                return usage_from_root(self.api, {"usage": merged, "model": self._anthropic_model})
            candidates = list(self._usage_raw)
            if tail is not None:
                candidates.append(tail)
            for raw in reversed(candidates):
                usage = extract_usage(self.api, raw)
                if usage is not None:
                    return usage
            return None
        except Exception:  # never raise from metering
            return None

    @property
    def usage_final(self) -> bool:
        """Whether the usage seen is the stream's final count, not a partial one: Anthropic's ``message_start``
        (output_tokens: 1) is partial until a ``message_delta`` carries the count; Gemini repeats a growing
        ``usageMetadata`` on every chunk until the one with ``finishReason``; the others report only at the end."""
        try:
            if self._kind == _ANTHROPIC:
                tail = self._tail_data()
                if tail is not None and tail.find(b'"message_delta"') >= 0:
                    return True
                return self._anthropic_delta
            if self._kind == _GOOGLE:
                tail = self._tail_data()
                last = tail if tail is not None and tail.find(b'"usageMetadata"') >= 0 else None
                if last is None and self._usage_raw:
                    last = self._usage_raw[-1]
                return last is not None and last.find(b'"finishReason"') >= 0
            return True
        except Exception:
            return False

    @property
    def output_text(self) -> str:
        """Generated text seen so far (answer, reasoning, tool arguments), at most `MAX_TEXT_BYTES` of it."""
        if self._decoded_parts != len(self._text):
            self._decoded = _decode_strings(self._text)
            self._decoded_parts = len(self._text)
        return self._decoded

    @property
    def output_chars(self) -> int:
        """Approximate length of all generated text seen, including what was counted but not kept."""
        return len(self.output_text) + self._text_dropped
