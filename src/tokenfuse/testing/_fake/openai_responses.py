"""The OpenAI Responses API: its usage object, the JSON ``response`` object, the typed SSE event stream
(``response.created`` … ``response.completed``), and the input items of a stored response.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from tokenfuse.testing._fake.common import _answer, _dumps, _encoded_pieces, _half, _head, _Plan, _Stream


def _responses_usage(u: Mapping[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": u["input_tokens"],
        "input_tokens_details": {"cached_tokens": u["cache_read_tokens"]},
        "output_tokens": u["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": u["output_reasoning_tokens"]},
        "total_tokens": u["input_tokens"] + u["output_tokens"],
    }


def _responses_object(
    rid: str, created: int, model: str, body: Mapping[str, Any], status: str, output: list[Any], usage: Any
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": {},
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": _stored(body),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "user": None,
        "usage": usage,
    }


def _stored(body: Mapping[str, Any]) -> bool:
    """Whether the real API would keep this response for ``GET /v1/responses/{id}`` (``store`` defaults to true)."""
    return body.get("store") is not False


def _responses_message(msg_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
    status = "in_progress" if text is None else "completed"
    return {"id": msg_id, "type": "message", "status": status, "content": content, "role": "assistant"}


def _responses_json(
    rid: str, created: int, model: str, body: Mapping[str, Any], plan: _Plan, with_usage: bool
) -> dict[str, Any]:
    output = [_responses_message("msg_" + rid[5:], _answer(plan.visible))]
    usage = _responses_usage(plan.usage) if with_usage else None
    return _responses_object(rid, created, model, body, "completed", output, usage)


def _responses_stream(
    rid: str, created: int, model: str, body: Mapping[str, Any], plan: _Plan, with_usage: bool
) -> _Stream:
    msg_id = "msg_" + rid[5:]
    text = _answer(plan.visible)
    seq = itertools.count()

    def event(kind: str, payload: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {_dumps({'type': kind, **payload, 'sequence_number': next(seq)})}\n\n"

    pending = _dumps(_responses_object(rid, created, model, body, "in_progress", [], None))
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    pieces = [
        f'event: {name}\ndata: {{"type":"{name}","response":{pending},"sequence_number":{next(seq)}}}\n\n'
        for name in ("response.created", "response.in_progress")
    ]
    pieces += [
        event("response.output_item.added", {"output_index": 0, "item": _responses_message(msg_id, None)}),
        event("response.content_part.added", {**where, "part": part}),
    ]
    kind = "response.output_text.delta"
    head = f"event: {kind}\ndata: " + _head({"type": kind, **where, "logprobs": []})
    for p in _encoded_pieces(plan.visible):
        pieces.append(f'{head}"delta":{p},"sequence_number":{next(seq)}}}\n\n')
    pieces.append(event("response.output_text.done", {**where, "logprobs": [], "text": text}))
    pieces.append(event("response.content_part.done", {**where, "part": {**part, "text": text}}))
    pieces.append(event("response.output_item.done", {"output_index": 0, "item": _responses_message(msg_id, text)}))
    usage = _responses_usage(plan.usage) if with_usage else None
    done = _responses_object(rid, created, model, body, "completed", [_responses_message(msg_id, text)], usage)
    pieces.append(event("response.completed", {"response": done}))
    return _Stream(pieces, cut_at=4 + _half(plan.visible), final=done)


def _input_item(rid: str, i: int, item: Any) -> dict[str, Any]:
    """One item of a request's ``input`` as the API lists it back: with an ``id``, messages with typed content."""
    if isinstance(item, str):
        item = {"role": "user", "content": item}
    if not isinstance(item, Mapping):
        return {"id": f"item_{rid[5:]}_{i}", "type": "unknown"}
    entry: dict[str, Any] = {"id": item.get("id") or f"msg_{rid[5:]}_{i}", "type": item.get("type", "message")}
    entry.update((k, v) for k, v in item.items() if k not in ("id", "type"))
    if entry["type"] == "message":
        content = entry.get("content")
        if isinstance(content, str):
            kind = "output_text" if entry.get("role") == "assistant" else "input_text"
            part: dict[str, Any] = {"type": kind, "text": content}
            if kind == "output_text":
                part["annotations"] = []
            entry["content"] = [part]
        entry.setdefault("status", "completed")
    return entry


def _responses_input_items(rid: str, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The input items of response ``rid``, in request order (``instructions`` are not an item)."""
    value = body.get("input")
    items: list[Any] = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [_input_item(rid, i, item) for i, item in enumerate(items)]
