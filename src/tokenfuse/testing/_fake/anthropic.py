"""Anthropic Messages: its usage object (wire ``input_tokens`` excludes cache reads and writes), the JSON
message and the SSE event stream (``message_start`` … ``message_stop``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Final

from tokenfuse.testing._fake.common import _SLOT, _answer, _dumps, _encoded_pieces, _half, _Plan, _Stream, _template


def _anthropic_usage(u: Mapping[str, int], output_tokens: int) -> dict[str, Any]:
    # Anthropic's input_tokens is only the uncached part; cache reads and writes are reported beside it.
    return {
        "input_tokens": u["input_tokens"] - u["cache_read_tokens"] - u["cache_write_tokens"],
        "cache_creation_input_tokens": u["cache_write_tokens"],
        "cache_read_input_tokens": u["cache_read_tokens"],
        "output_tokens": output_tokens,
    }


def _anthropic_stop(plan: _Plan) -> str:
    return "max_tokens" if plan.truncated else "end_turn"


def _anthropic_json(rid: str, model: str, plan: _Plan, with_usage: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": _answer(plan.visible)}],
        "stop_reason": _anthropic_stop(plan),
        "stop_sequence": None,
    }
    if with_usage:
        out["usage"] = _anthropic_usage(plan.usage, plan.usage["output_tokens"])
    return out


@functools.lru_cache(maxsize=512)
def _anthropic_text_events(n: int) -> tuple[str, ...]:
    """The ``content_block_delta`` events of an ``n``-token answer: nothing in them depends on the request."""
    before, after = _template(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": _SLOT}}
    )
    return tuple(f"event: content_block_delta\ndata: {before}{p}{after}\n\n" for p in _encoded_pieces(n))


def _anthropic_stream(rid: str, model: str, plan: _Plan, with_usage: bool) -> _Stream:
    def event(kind: str, payload: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {_dumps({'type': kind, **payload})}\n\n"

    message: dict[str, Any] = {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    # Like the real API, message_start carries the input side and a provisional output count; message_delta
    # carries the final (cumulative) output count. A meter that adds both up double-counts.
    start_output = min(1, plan.usage["output_tokens"])
    if with_usage:
        message["usage"] = _anthropic_usage(plan.usage, start_output)
    pieces = [event("message_start", {"message": message}), _ANTHROPIC_BLOCK_START]
    pieces.extend(_anthropic_text_events(plan.visible))
    pieces.append(_ANTHROPIC_BLOCK_STOP)
    delta: dict[str, Any] = {"delta": {"stop_reason": _anthropic_stop(plan), "stop_sequence": None}}
    if with_usage:
        delta["usage"] = _anthropic_usage(plan.usage, plan.usage["output_tokens"])
    pieces.append(event("message_delta", delta))
    pieces.append(_ANTHROPIC_MESSAGE_STOP)
    cut_usage = {**plan.usage, "output_tokens": start_output} if with_usage else None
    return _Stream(pieces, cut_at=2 + _half(plan.visible), cut_usage=cut_usage)


_ANTHROPIC_BLOCK_START: Final = (
    'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text",'
    '"text":""}}\n\nevent: ping\ndata: {"type":"ping"}\n\n'
)
_ANTHROPIC_BLOCK_STOP: Final = 'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_ANTHROPIC_MESSAGE_STOP: Final = 'event: message_stop\ndata: {"type":"message_stop"}\n\n'
