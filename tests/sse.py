"""Anthropic Messages SSE events for tests of cut and complete streams (the shape the real API sends)."""

from __future__ import annotations

import json

__all__ = ["anthropic_events"]


def anthropic_events(deltas: list[str], final: bool, output_tokens: int = 600) -> list[bytes]:
    """``message_start`` (input 25, output 1, as the API reports before generating), one ``content_block_delta`` per
    text in ``deltas``, and, when ``final``, the ``message_delta`` with the final output count."""
    start = {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant",
             "model": "claude-sonnet-4-5", "content": [], "usage": {"input_tokens": 25, "output_tokens": 1}}}  # fmt: skip
    out = [b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n"]
    for d in deltas:
        ev = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}}
        out.append(b"event: content_block_delta\ndata: " + json.dumps(ev).encode() + b"\n\n")
    if final:
        md = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": output_tokens}}
        out.append(b"event: message_delta\ndata: " + json.dumps(md).encode() + b"\n\n")
    return out
